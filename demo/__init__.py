"""The demo and the test data: synthetic chest radiographs (``synthetic``) and the demo run
(``pipeline``). Outside the core package: production installs never import it."""

"""Read models for the dashboard: typed functions over an explicit session, no Streamlit inside.

``worklist`` lists studies with their latest score; ``study_view`` gathers one study and renders
its images. Pages call these and never build SQL themselves.
"""

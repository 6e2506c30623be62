// Radflow's volume viewer: a Streamlit component (protocol v1) written by hand.
//
// The page sends a whole series once (radflow.services.volume_view): int16 voxels, each slice
// as its low bytes then its high bytes, zlib-deflated on its own, in axes (feet, posterior, left), so an axial slice is a contiguous
// block and coronal and sagittal reformats are strides through it. The browser inflates the slice
// it shows first and the rest after it (DecompressionStream), then scrolls, reformats, windows and
// draws the layers (heat map, label map) with no server round trip.
//
// A page that has not packed the series yet sends a preview first: the slice the viewer opens
// on, alone, with the whole volume's geometry (volume.first). The viewer shows it and at once
// asks for the whole series (its component value "whole", which reruns the page's fragment);
// the whole series then arrives as new arguments and fills in around the slice on screen.
//
// Measures it keeps, for the tests and benchmarks/viewer.py: on #viewer, data-first-drawn and
// data-all-in (epoch ms when the first slice reached the screen, when every slice was inflated);
// window.radflowViewer.steps (ms from each scroll input to the frame that shows its slice) and
// .bytes (the packed series' size).
"use strict";

(() => {
  const PLANES = ["axial", "coronal", "sagittal"];
  const KEY_STEPS = { ArrowUp: -1, ArrowLeft: -1, ArrowDown: 1, ArrowRight: 1, PageUp: -10, PageDown: 10 };
  const LABEL_COLOURS = [
    [0, 255, 77], [255, 214, 0], [0, 170, 255], [255, 64, 160], [255, 128, 0], [160, 96, 255],
  ];
  // The jet colour map of radflow.services.study_view (blue cold, red hot).
  const JET = [
    [0.0, 0, 0, 0.5], [0.125, 0, 0, 1], [0.375, 0, 1, 1], [0.625, 1, 1, 0], [0.875, 1, 0, 0], [1.0, 0.5, 0, 0],
  ];

  const root = document.getElementById("viewer");
  const canvas = document.getElementById("canvas");
  const context = canvas.getContext("2d");
  const slider = document.getElementById("slice");
  const windowSelect = document.getElementById("window");
  const layerBar = document.getElementById("layers");
  const corner = document.getElementById("corner");
  const caption = document.getElementById("caption");
  const planeButtons = Array.from(document.querySelectorAll("button[data-plane]"));
  const metrics = { steps: [], firstDrawn: null, bytes: 0, renders: [] };
  window.radflowViewer = metrics;

  let series = null; // what the current arguments describe (see load)
  let signature = null;
  let pending = null; // a redraw requested for the next frame
  let stageHeight = 600;

  // --- Streamlit's component protocol -----------------------------------------------------

  function send(type, data) {
    window.parent.postMessage(Object.assign({ isStreamlitMessage: true, type }, data), "*");
  }

  window.addEventListener("message", (event) => {
    if (event.source === window.parent && event.data && event.data.type === "streamlit:render") {
      load(event.data.args);
    }
  });

  // The image takes what the page's height leaves: the frame then keeps the height the page
  // gave it (a new height would make Streamlit post the arguments, the whole series, again).
  function fitHeight(height) {
    const others = document.body.scrollHeight - canvas.offsetHeight;
    stageHeight = Math.max(200, height - others);
    canvas.style.height = `${stageHeight}px`;
    send("streamlit:setFrameHeight", { height: Math.ceil(document.body.scrollHeight) });
  }

  // --- loading ------------------------------------------------------------------------------

  async function inflate(bytes) {
    // A stream over the bytes themselves (a Blob would copy them to the browser's process).
    const source = new ReadableStream({ start(controller) { controller.enqueue(bytes); controller.close(); } });
    return new Uint8Array(await new Response(source.pipeThrough(new DecompressionStream("deflate"))).arrayBuffer());
  }

  // A slice's low bytes then high bytes, back into int16 values at `offset` of `out`.
  function interleave(planes, out, offset, area) {
    for (let i = 0; i < area; i++) out[offset + i] = planes[i] | (planes[area + i] << 8);
  }

  function load(args) {
    metrics.renders.push(performance.timeOrigin + performance.now());
    const volume = args.volume;
    const key = JSON.stringify([volume, args.voxels.byteLength, args.layers]);
    caption.textContent = args.caption || "";
    if (key === signature) return; // a rerun of the page: the same series, already here
    signature = key;
    metrics.bytes = args.voxels.byteLength;
    if (series && series.volume.first !== null && sameGeometry(series.volume, volume)) {
      complete(series, args); // the whole series after its preview
    } else {
      start(args);
    }
    fitHeight(args.height || 720);
  }

  function sameGeometry(a, b) {
    return JSON.stringify([a.shape, a.acquired]) === JSON.stringify([b.shape, b.acquired]);
  }

  function start(args) {
    const volume = args.volume;
    const [depth, rows, columns] = volume.shape;
    series = {
      volume,
      voxels: new Int16Array(depth * rows * columns),
      loaded: new Uint8Array(depth),
      loadedCount: 0,
      plane: volume.acquired,
      index: { axial: volume.first ?? depth >> 1, coronal: rows >> 1, sagittal: columns >> 1 },
      window: volume.windows[0],
      lut: new Uint32Array(65536),
      layers: [],
    };
    if (volume.first !== null) send("streamlit:setComponentValue", { value: "whole", dataType: "json" });
    setLayers(args);
    buildControls();
    buildLut();
    root.dataset.state = "loading";
    inflateVoxels(series, args.voxels);
  }

  // The whole series arrives: the plane, slice and window chosen on the preview stay.
  function complete(target, args) {
    const before = target.volume;
    const volume = args.volume;
    target.volume = volume;
    if (before.slope !== volume.slope || before.intercept !== volume.intercept) {
      target.loaded.fill(0); // the preview's slice was scaled otherwise: inflate it again
      target.loadedCount = 0;
    }
    const names = (windows) => JSON.stringify(windows.map((w) => w.name));
    const chosen = Number(windowSelect.value) || 0;
    target.window = volume.windows[names(before.windows) === names(volume.windows) ? chosen : 0];
    if (JSON.stringify(args.layers) !== JSON.stringify(target.layers.map(describeLayer))) {
      setLayers(args);
    }
    buildControls();
    windowSelect.value = String(volume.windows.indexOf(target.window));
    buildLut();
    inflateVoxels(target, args.voxels);
  }

  function describeLayer(layer) {
    return { name: layer.name, kind: layer.kind, shape: layer.shape, factors: layer.factors };
  }

  function setLayers(args) {
    series.layers = args.layers.map((layer, i) => ({
      ...layer, bytes: args[`layer${i}`], values: null, visible: true,
      opacity: layer.kind === "heat" ? 0.5 : 0.4, style: "fill",
    }));
    series.layers.forEach((layer) => inflate(layer.bytes).then((values) => {
      layer.values = values;
      requestDraw();
    }));
  }

  // The slice on screen first, then the others outwards from it, a few at a time. Chunk i of
  // `bytes` is slice i, or the preview's one slice.
  async function inflateVoxels(target, bytes) {
    const { ends, shape, first: preview } = target.volume;
    const area = shape[1] * shape[2];
    const slices = preview === null ? ends.map((_, i) => i) : [preview];
    const from = target.plane === "axial" ? target.index.axial : 0;
    slices.sort((a, b) => Math.abs(a - from) - Math.abs(b - from) || a - b);
    const chunks = new Map(slices.map((s) => [s, preview === null ? s : 0]));
    const order = slices.filter((s) => !target.loaded[s]);
    let next = 0;
    const worker = async () => {
      while (next < order.length && target === series && target.volume.first === preview) {
        const s = order[next++];
        const c = chunks.get(s);
        const values = await inflate(bytes.subarray(c === 0 ? 0 : ends[c - 1], ends[c]));
        // Meanwhile the whole series may have replaced the preview (and its scaling).
        if (target !== series || target.volume.first !== preview || target.loaded[s]) continue;
        interleave(values, target.voxels, s * area, area);
        target.loaded[s] = 1;
        target.loadedCount++;
        requestDraw();
      }
    };
    await Promise.all([worker(), worker(), worker(), worker()]);
    if (target === series && preview === null && target.loadedCount === shape[0]) {
      root.dataset.allIn = String(performance.timeOrigin + performance.now());
      requestDraw();
    }
  }

  // --- controls -----------------------------------------------------------------------------

  function buildControls() {
    windowSelect.replaceChildren(...series.volume.windows.map((w, i) => {
      const option = document.createElement("option");
      option.value = String(i);
      option.textContent = w.name;
      return option;
    }));
    layerBar.replaceChildren(...series.layers.map(layerControls));
    const [depth, rows, columns] = series.volume.shape;
    const sizes = { axial: depth, coronal: rows, sagittal: columns };
    planeButtons.forEach((b) => { b.disabled = sizes[b.dataset.plane] < 2; });
    setPlane(series.plane);
  }

  function layerControls(layer) {
    const box = document.createElement("label");
    box.className = "layer";
    const visible = document.createElement("input");
    visible.type = "checkbox";
    visible.checked = layer.visible;
    visible.setAttribute("aria-label", `Show ${layer.name}`);
    visible.addEventListener("change", () => { layer.visible = visible.checked; requestDraw(); });
    const name = document.createElement("span");
    name.textContent = layer.name; // from the page: plain text, never HTML
    const opacity = document.createElement("input");
    opacity.type = "range";
    opacity.min = "0";
    opacity.max = "1";
    opacity.step = "0.05";
    opacity.value = String(layer.opacity);
    opacity.setAttribute("aria-label", `${layer.name} opacity`);
    opacity.addEventListener("input", () => { layer.opacity = Number(opacity.value); requestDraw(); });
    box.append(visible, name, opacity);
    if (layer.kind === "labels") {
      const style = document.createElement("select");
      style.setAttribute("aria-label", `${layer.name} style`);
      for (const value of ["fill", "contour"]) {
        const option = document.createElement("option");
        option.value = value;
        option.textContent = value[0].toUpperCase() + value.slice(1);
        style.append(option);
      }
      style.value = layer.style;
      style.addEventListener("change", () => { layer.style = style.value; requestDraw(); });
      box.append(style);
    }
    return box;
  }

  function setPlane(plane) {
    series.plane = plane;
    planeButtons.forEach((b) => b.setAttribute("aria-pressed", String(b.dataset.plane === plane)));
    slider.max = String(count(plane));
    slider.value = String(series.index[plane] + 1);
    requestDraw();
  }

  function count(plane) {
    const [depth, rows, columns] = series.volume.shape;
    return { axial: depth, coronal: rows, sagittal: columns }[plane];
  }

  function step(delta, started) {
    if (!series) return;
    const plane = series.plane;
    const index = Math.min(count(plane) - 1, Math.max(0, series.index[plane] + delta));
    if (index === series.index[plane]) return;
    series.index[plane] = index;
    slider.value = String(index + 1);
    draw();
    requestAnimationFrame(() => metrics.steps.push(performance.now() - started));
  }

  planeButtons.forEach((b) => b.addEventListener("click", () => series && setPlane(b.dataset.plane)));
  windowSelect.addEventListener("change", () => {
    series.window = series.volume.windows[Number(windowSelect.value)];
    buildLut();
    requestDraw();
  });
  slider.addEventListener("input", (event) => {
    if (series) step(Number(slider.value) - 1 - series.index[series.plane], event.timeStamp);
  });
  canvas.addEventListener("wheel", (event) => {
    event.preventDefault();
    if (event.deltaY !== 0) step(Math.sign(event.deltaY), event.timeStamp);
  }, { passive: false });

  // Arrow keys scroll whether the viewer or the page has the focus (not while typing or on
  // another control); any other key pressed in here goes on to the page, whose shortcuts
  // (agree, disagree, next) must work wherever the reader's focus is.
  const BUTTON_LIKE = ["checkbox", "radio", "range", "button", "submit", "reset", "file", "color"];

  // Whether a key pressed on `target` is meant for it: text typed, an option chosen, a control
  // (a slider, a table) moved with the arrows.
  function typing(target) {
    if (!target || !target.tagName) return false;
    const tag = target.tagName;
    return target.isContentEditable || tag === "TEXTAREA" || tag === "SELECT"
      || (tag === "INPUT" && !BUTTON_LIKE.includes(target.type))
      || Boolean(target.closest && target.closest('[role="slider"], [role="grid"], [role="listbox"]'));
  }

  function onKey(event, started) {
    const delta = KEY_STEPS[event.key];
    if (delta === undefined || !series || event.altKey || event.ctrlKey || event.metaKey) {
      return false;
    }
    if (event.defaultPrevented || typing(event.target)) return false;
    event.preventDefault();
    step(delta, started);
    return true;
  }

  document.addEventListener("keydown", (event) => {
    if (!onKey(event, event.timeStamp)) forward(event);
  });
  document.addEventListener("keyup", forward);

  function forward(event) {
    if (typing(event.target) || KEY_STEPS[event.key] !== undefined) return;
    try {
      const copy = new window.parent.KeyboardEvent(event.type, {
        key: event.key, code: event.code, altKey: event.altKey, ctrlKey: event.ctrlKey,
        shiftKey: event.shiftKey, metaKey: event.metaKey, repeat: event.repeat, bubbles: true,
      });
      // Shortcut libraries still read the legacy codes, which a constructed event lacks.
      Object.defineProperty(copy, "keyCode", { get: () => event.keyCode });
      Object.defineProperty(copy, "which", { get: () => event.which });
      window.parent.document.dispatchEvent(copy);
    } catch (error) {
      // Another origin (never in Radflow): the page's shortcuts need its own focus then.
    }
  }

  const onParentKey = (event) => onKey(event, performance.now());
  try {
    window.parent.document.addEventListener("keydown", onParentKey);
    window.addEventListener("pagehide", () => {
      window.parent.document.removeEventListener("keydown", onParentKey);
    });
  } catch (error) {
    // Another origin: arrow keys work once the viewer has the focus.
  }

  // --- drawing ------------------------------------------------------------------------------

  const base = document.createElement("canvas");
  const baseContext = base.getContext("2d");
  const overlay = document.createElement("canvas");
  const overlayContext = overlay.getContext("2d");

  function requestDraw() {
    if (pending === null) pending = requestAnimationFrame(() => { pending = null; draw(); });
  }

  // Linear DICOM window (PS3.3 C.11.2.1.2.1) over every int16 value, as packed grey pixels.
  function buildLut() {
    const { slope, intercept } = series.volume;
    const { center, width } = series.window;
    const low = center - 0.5 - (width - 1) / 2;
    const scale = 255 / Math.max(width - 1, 1);
    for (let s = 0; s < 65536; s++) {
      const value = (s - 32768) * slope + intercept;
      const grey = Math.max(0, Math.min(255, Math.round((value - low) * scale)));
      series.lut[s] = 0xff000000 | (grey << 16) | (grey << 8) | grey;
    }
  }

  // (columns, rows) of a plane's image and the spacing (mm) between them.
  function planeGeometry(plane) {
    const [depth, rows, columns] = series.volume.shape;
    const [sd, sr, sc] = series.volume.spacing;
    if (plane === "axial") return { width: columns, height: rows, dx: sc, dy: sr };
    if (plane === "coronal") return { width: columns, height: depth, dx: sc, dy: sd };
    return { width: rows, height: depth, dx: sr, dy: sd };
  }

  // Copies the shown slice of a (depth, rows, columns) array through `pixel` into `out`.
  function extract(values, shape, plane, k, out, pixel) {
    const [depth, rows, columns] = shape;
    const area = rows * columns;
    if (plane === "axial") {
      const start = k * area;
      for (let i = 0; i < area; i++) out[i] = pixel(values[start + i]);
    } else if (plane === "coronal") {
      for (let z = 0, o = 0; z < depth; z++) {
        const start = z * area + k * columns;
        for (let x = 0; x < columns; x++) out[o++] = pixel(values[start + x]);
      }
    } else {
      for (let z = 0, o = 0; z < depth; z++) {
        const start = z * area + k;
        for (let y = 0; y < rows; y++) out[o++] = pixel(values[start + y * columns]);
      }
    }
  }

  function draw() {
    if (!series) return;
    const plane = series.plane;
    const k = series.index[plane];
    const geometry = planeGeometry(plane);
    const image = new ImageData(geometry.width, geometry.height);
    const lut = series.lut;
    extract(series.voxels, series.volume.shape, plane, k, new Uint32Array(image.data.buffer),
      (v) => lut[v + 32768]);
    base.width = geometry.width;
    base.height = geometry.height;
    baseContext.putImageData(image, 0, 0);

    const box = fit(geometry);
    context.fillStyle = "#000";
    context.fillRect(0, 0, canvas.width, canvas.height);
    context.imageSmoothingEnabled = true;
    context.drawImage(base, box.x, box.y, box.width, box.height);
    for (const layer of series.layers) {
      if (layer.visible && layer.values && layer.opacity > 0) drawLayer(layer, plane, k, box);
    }
    const depth = series.volume.shape[0];
    describe(plane, k, plane === "axial" ? series.loaded[k] === 1 : series.loadedCount === depth);
  }

  // The canvas sized to the stage, and where the image goes on it at its physical aspect.
  function fit(geometry) {
    const ratio = window.devicePixelRatio || 1;
    const cssWidth = canvas.clientWidth || 600;
    const cssHeight = stageHeight;
    if (canvas.width !== Math.round(cssWidth * ratio) || canvas.height !== Math.round(cssHeight * ratio)) {
      canvas.width = Math.round(cssWidth * ratio);
      canvas.height = Math.round(cssHeight * ratio);
    }
    const physicalWidth = geometry.width * geometry.dx;
    const physicalHeight = geometry.height * geometry.dy;
    const scale = Math.min(canvas.width / physicalWidth, canvas.height / physicalHeight);
    const width = physicalWidth * scale;
    const height = physicalHeight * scale;
    return {
      x: (canvas.width - width) / 2, y: (canvas.height - height) / 2, width, height,
      pixelWidth: width / geometry.width, pixelHeight: height / geometry.height,
    };
  }

  function drawLayer(layer, plane, k, box) {
    const axis = PLANES.indexOf(plane);
    const factors = layer.factors;
    const lk = Math.min(layer.shape[axis] - 1, Math.floor(k / factors[axis]));
    const [ld, lr, lc] = layer.shape;
    const size = plane === "axial" ? [lc, lr] : plane === "coronal" ? [lc, ld] : [lr, ld];
    const cell = plane === "axial" ? [factors[2], factors[1]]
      : plane === "coronal" ? [factors[2], factors[0]] : [factors[1], factors[0]];
    const values = new Uint8Array(size[0] * size[1]);
    extract(layer.values, layer.shape, plane, lk, values, (v) => v);
    const image = new ImageData(size[0], size[1]);
    const out = new Uint32Array(image.data.buffer);
    if (layer.kind === "heat") {
      for (let i = 0; i < values.length; i++) out[i] = jet(values[i], layer.opacity);
    } else {
      labelPixels(values, size[0], size[1], layer, out);
    }
    overlay.width = size[0];
    overlay.height = size[1];
    overlayContext.putImageData(image, 0, 0);
    context.save();
    context.beginPath();
    context.rect(box.x, box.y, box.width, box.height);
    context.clip();
    context.imageSmoothingEnabled = layer.kind === "heat";
    context.drawImage(overlay, box.x, box.y, size[0] * cell[0] * box.pixelWidth,
      size[1] * cell[1] * box.pixelHeight);
    context.restore();
  }

  function jet(value, opacity) {
    if (value === 0) return 0;
    const t = value / 255;
    let i = 1;
    while (i < JET.length - 1 && JET[i][0] < t) i++;
    const [t0, r0, g0, b0] = JET[i - 1];
    const [t1, r1, g1, b1] = JET[i];
    const f = (t - t0) / (t1 - t0);
    const channel = (a, b) => Math.round((a + (b - a) * f) * 255);
    const alpha = Math.round(opacity * t * 255);
    return (alpha << 24 >>> 0) + (channel(b0, b1) << 16) + (channel(g0, g1) << 8) + channel(r0, r1);
  }

  function labelPixels(values, width, height, layer, out) {
    const alpha = Math.round(layer.opacity * 255);
    const contour = layer.style === "contour";
    for (let y = 0, i = 0; y < height; y++) {
      for (let x = 0; x < width; x++, i++) {
        const label = values[i];
        if (label === 0) continue;
        if (contour) {
          const inside = x > 0 && x < width - 1 && y > 0 && y < height - 1
            && values[i - 1] === label && values[i + 1] === label
            && values[i - width] === label && values[i + width] === label;
          if (inside) continue;
        }
        const [r, g, b] = LABEL_COLOURS[(label - 1) % LABEL_COLOURS.length];
        out[i] = ((contour ? 255 : alpha) << 24 >>> 0) + (b << 16) + (g << 8) + r;
      }
    }
  }

  function describe(plane, k, shown) {
    const total = count(plane);
    const { center, width } = series.window;
    const loaded = series.loadedCount;
    const depth = series.volume.shape[0];
    corner.textContent = `${plane[0].toUpperCase()}${plane.slice(1)} ${k + 1}/${total}\n`
      + `W ${Math.round(width)} L ${Math.round(center)}`
      + (loaded < depth ? `\nloading ${loaded}/${depth}` : "");
    root.dataset.plane = plane;
    root.dataset.index = String(k + 1);
    root.dataset.count = String(total);
    root.dataset.loaded = String(loaded);
    root.dataset.state = loaded < depth ? "loading" : "ready";
    if (shown && metrics.firstDrawn === null) {
      requestAnimationFrame(() => {
        if (metrics.firstDrawn !== null) return;
        metrics.firstDrawn = performance.timeOrigin + performance.now();
        root.dataset.firstDrawn = String(metrics.firstDrawn);
      });
    }
  }

  window.addEventListener("resize", requestDraw);
  send("streamlit:componentReady", { apiVersion: 1 });
})();

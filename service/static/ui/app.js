// camserve debugging page. Plain JavaScript, no build step, no network beyond this server.
// The server sends each heatmap as a greyscale PNG at the upload's size; the page colours and blends it
// itself (with the server's own colormap tables), so colormap and opacity changes need no request.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_STORAGE = "camserve-api-key";
  const TOP_K = 5;

  // Exposed for tests and for people poking at the page from the console.
  // `requests` counts every request the page made; `pending` those not answered yet; `ready` turns true
  // once the models are listed.
  const page = (window.camserve = { requests: 0, pending: 0, ready: false });

  const state = {
    models: [],
    model: null,        // the entry of GET /models for the selected model
    image: null,        // {blob, name, sampleUrl}
    pixels: null,       // ImageData of the image, at its natural size
    reference: null,    // {blob, name, sampleUrl, pixels}: the second image an embedding is compared with
    similarity: null,   // cosine similarity of the image's embedding to the reference's
    predictions: [],
    selected: null,     // class index being explained
    view: "single",
    colormaps: null,    // name -> 256 [r, g, b]
    shown: [],          // [{canvas, levels, width, height}] heatmaps on screen, re-blended on control changes
    single: null,       // {label, method} of the single view, for the download name
    generation: 0,      // bumps on every new image or view request, so late answers are dropped
  };

  // ---- HTTP --------------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message, requestId) {
      super(message);
      this.status = status;
      this.code = code;
      this.requestId = requestId;
    }
  }

  function apiKey() {
    return sessionStorage.getItem(KEY_STORAGE) || "";
  }

  // Counts an operation (a request, or a whole image or view update) as pending until it settles, so
  // `pending === 0` means the page shows the answers to everything asked so far.
  async function tracked(work) {
    page.pending += 1;
    document.body.dataset.state = "busy";
    try {
      return await work();
    } finally {
      page.pending -= 1;
      if (page.pending === 0) document.body.dataset.state = "idle";
    }
  }

  async function api(path, options = {}) {
    const headers = new Headers(options.headers || {});
    if (apiKey()) headers.set("X-API-Key", apiKey());
    page.requests += 1;
    return tracked(async () => {
      let response;
      try {
        response = await fetch(path, { ...options, headers });
      } catch (err) {
        throw new ApiError(0, "network_error", `the server could not be reached (${err.message})`, "");
      }
      if (!response.ok) {
        const requestId = response.headers.get("X-Request-ID") || "";
        let code = "http_error";
        let message = `${response.status} ${response.statusText}`;
        try {
          const body = await response.json();
          if (body && body.error) ({ code, message } = body.error);
        } catch (_) { /* not JSON: keep the status line */ }
        throw new ApiError(response.status, code, message, requestId);
      }
      return response;
    });
  }

  function showError(err) {
    const box = $("error");
    if (!err) {
      box.hidden = true;
      box.textContent = "";
      return;
    }
    if (err instanceof ApiError) {
      const rid = err.requestId ? ` (request id ${err.requestId})` : "";
      box.textContent = `Error ${err.status || ""} ${err.code}: ${err.message}${rid}`;
      if (err.status === 401) {
        $("key-form").hidden = false;
        $("key-input").focus();
      }
    } else {
      box.textContent = `Error: ${err.message || err}`;
    }
    box.hidden = false;
    announce(box.textContent);
  }

  function announce(text) {
    $("status").textContent = text;
  }

  // ---- curl ----------------------------------------------------------------------------------------

  const shellQuote = (s) => `'${String(s).replace(/'/g, "'\\''")}'`;

  function curlFor(path, fields) {
    const parts = ["curl -s"];
    if (apiKey()) parts.push('-H "X-API-Key: $CAMSERVE_API_KEY"');
    for (const { file } of requestImages()) parts.push(`-F ${shellQuote("image=@" + file)}`);
    for (const [k, v] of fields) parts.push(`-F ${shellQuote(`${k}=${v}`)}`);
    parts.push(shellQuote(location.origin + path));
    return parts.join(" ");
  }

  // A name that is safe as a curl -F file reference (no ';' or ',' which curl would parse).
  const safeName = (name, fallback) => (name || fallback).replace(/[;,"]/g, "_");

  // The images every request sends, each with the file name it is uploaded (and saved by curl) under: the
  // image, and for an embedding model the reference too, as image 1 of the same request.
  function requestImages() {
    if (!state.image) return [];
    const first = { ...state.image, file: safeName(state.image.name, "image.png") };
    if (!isEmbedding() || !state.reference) return [first];
    let file = safeName(state.reference.name, "reference.png");
    // Two files under one name would overwrite each other where the curl command runs.
    if (file === first.file) file = `reference-${file}`;
    return [first, { ...state.reference, file }];
  }

  function showCurl(commands) {
    // A sample lives on the server: fetch it first, so the command runs as it stands.
    const downloads = requestImages().filter((im) => im.sampleUrl)
      .map(({ file, sampleUrl }) => `curl -s -o ${shellQuote(file)} ${shellQuote(location.origin + sampleUrl)}`);
    const chain = [...downloads, ...commands];
    const note = apiKey() ? "# export CAMSERVE_API_KEY=<your key> first\n" : "";
    $("curl").textContent = note + chain.join(" &&\n");
  }

  // ---- models, samples, colormaps -------------------------------------------------------------------

  async function loadModels() {
    const body = await (await api("/models")).json();
    state.models = body.models;
    const select = $("model-select");
    select.replaceChildren(...body.models.map((m) => new Option(m.name, m.name, false, m.name === body.default)));
    setModel(select.value);
  }

  const isEmbedding = () => state.model?.task === "embedding";

  function setModel(name) {
    state.model = state.models.find((m) => m.name === name) || null;
    const m = state.model;
    if (!m) return;
    const embedding = isEmbedding();
    const size = embedding ? `an embedding of ${m.num_classes} numbers` : `${m.num_classes} classes`;
    $("model-info").textContent = `${size}, input ${m.input_size.join("x")}, ${m.device}`;
    // An embedding model answers a vector, not classes: the page compares it with a reference image's.
    $("reference-panel").hidden = !embedding;
    $("embedding-info").hidden = !embedding;
    $("predictions").hidden = embedding;
    $("pred-hint").textContent = embedding
      ? "An embedding model answers a vector: the page compares it with a reference image's (Image panel)."
      : "Choose a class to explain it.";
    $("tab-classes").hidden = embedding;  // one similarity per image: there are no top classes to line up
    if (embedding && state.view === "classes") showTab("single");
    const methods = $("method-select");
    const previous = methods.value;
    methods.replaceChildren(...m.methods.map((x) => new Option(x, x)));
    if (m.methods.includes(previous)) methods.value = previous;
    $("layer-select").replaceChildren(...m.layers.map((x, i) => new Option(i === 0 ? `${x} (default)` : x, x)));
    const explainable = m.methods.length > 0;
    for (const id of ["view-single", "view-compare", "view-classes"]) $(id).classList.toggle("off", !explainable);
    $("explain-off").hidden = explainable;
  }

  async function loadSamples() {
    const samples = await (await api("/ui/samples")).json();
    $("samples").replaceChildren(...samples.map((s) => sampleButton(s, "sample-button", `A ${s.label} scene`,
                                                                     () => useSample(s))));
    $("reference-samples").replaceChildren(...samples.map((s) => sampleButton(
      s, "reference-sample", `Compare with a ${s.label} scene`, () => useSample(s, setReference))));
  }

  function sampleButton(sample, testid, title, onClick) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "sample";
    b.dataset.testid = testid;
    b.dataset.label = sample.label;
    b.title = title;
    const img = new Image();
    img.src = sample.url;
    img.alt = "";
    b.append(img, document.createTextNode(sample.label));
    b.addEventListener("click", onClick);
    return b;
  }

  async function loadColormaps() {
    state.colormaps = await (await api("/ui/colormaps")).json();
    const select = $("colormap-select");
    const previous = select.value;
    select.replaceChildren(...Object.keys(state.colormaps).map((name) => new Option(name, name)));
    if (previous in state.colormaps) select.value = previous;
  }

  // ---- the image -------------------------------------------------------------------------------------

  // One tracked operation from the sample's download to the answers: between the download's end and the
  // image's update nothing else is pending, and the page would read as idle while about to change (a browser
  // test read the curl of the /predict that followed such a moment, not the /explain after it).
  // `use` is setImage or setReference: where the downloaded sample goes.
  function useSample(sample, use = setImage) {
    return tracked(async () => {
      try {
        await use(await fetchSample(sample));
      } catch (err) {
        showError(err);
      }
    });
  }

  async function fetchSample(sample) {
    const blob = await (await api(sample.url)).blob();
    return { blob, name: `${sample.label}.png`, sampleUrl: sample.url };
  }

  function setImage(image) {
    return tracked(() => showImage(image));
  }

  async function showImage(image) {
    state.generation += 1;
    state.image = image;
    state.pixels = null;
    state.predictions = [];
    state.selected = null;
    clearViews();
    $("predictions").replaceChildren();
    $("original-caption").textContent = image.name;
    state.pixels = await showPicture($("original"), image.blob);
    $("original-caption").textContent = pictureCaption(image.name, state.pixels);
    await predict();
  }

  // Shows `blob` in `img`; returns its pixels at their natural size, or null where the browser cannot decode
  // it (e.g. TIFF): the server may still read it, so that is for the server to decide.
  async function showPicture(img, blob) {
    if (img.src) URL.revokeObjectURL(img.src);
    img.src = URL.createObjectURL(blob);
    img.hidden = false;
    try {
      await img.decode();
    } catch (_) {
      img.hidden = true;
      return null;
    }
    const c = document.createElement("canvas");
    c.width = img.naturalWidth;
    c.height = img.naturalHeight;
    const ctx = c.getContext("2d");
    ctx.drawImage(img, 0, 0);
    return ctx.getImageData(0, 0, c.width, c.height);
  }

  function pictureCaption(name, pixels) {
    return pixels ? `${name}, ${pixels.width}x${pixels.height}` : `${name} (this browser cannot display it)`;
  }

  function setReference(reference) {
    return tracked(() => showReference(reference));
  }

  // A new reference (or none) changes what an embedding model's image is explained by: predict again.
  async function showReference(reference) {
    state.reference = reference;
    const img = $("reference");
    if (reference) {
      reference.pixels = await showPicture(img, reference.blob);
      $("reference-caption").textContent = pictureCaption(reference.name, reference.pixels);
    } else {
      if (img.src) URL.revokeObjectURL(img.src);
      img.removeAttribute("src");
      img.hidden = true;
      $("reference-caption").textContent = "No reference image yet.";
    }
    $("reference-clear").disabled = !reference;
    if (!state.image) return;
    state.generation += 1;
    clearViews();
    await predict();
  }

  function formFor(fields) {
    const form = new FormData();
    for (const { blob, file } of requestImages()) form.append("image", blob, file);
    for (const [k, v] of fields) form.append(k, v);
    return form;
  }

  async function predict() {
    if (!state.image || !state.model) return;
    if (isEmbedding()) return predictEmbedding();
    const generation = state.generation;
    const fields = [["model", state.model.name], ["top_k", String(Math.min(TOP_K, state.model.num_classes))]];
    showCurl([curlFor("/predict", fields)]);
    try {
      const body = await (await api("/predict", { method: "POST", body: formFor(fields) })).json();
      if (generation !== state.generation) return;
      showError(null);
      const result = body.results[0];
      state.mask = null;
      if (result.detections) {
        // A detector's list: each row explains that detection (its index is the target).
        state.predictions = result.detections.map((d) => ({ ...d, label: `${d.label} #${d.index}` }));
      } else if (result.segments) {
        state.predictions = result.segments.map((g) => ({ ...g, detail: `${g.area} px` }));
        const [height, width] = [state.pixels?.height, state.pixels?.width];
        if (result.mask && width) state.mask = await decodeLevels({ data: result.mask, width, height });
      } else {
        state.predictions = result.predictions || [];
      }
      if (!state.predictions.length) throw new Error("Nothing found in this image.");
      renderPredictions();
      if (state.model.methods.length) await selectClass(state.predictions[0].index);
    } catch (err) {
      if (generation === state.generation) showError(err);
    }
  }

  // One /predict with the image and the reference: their embeddings give the cosine similarity that the
  // maps explain (the API's `similar_to` target differentiates the same cosine).
  async function predictEmbedding() {
    const generation = state.generation;
    const fields = [["model", state.model.name]];
    showCurl([curlFor("/predict", fields)]);
    try {
      const body = await (await api("/predict", { method: "POST", body: formFor(fields) })).json();
      if (generation !== state.generation) return;
      showError(null);
      const [mine, theirs] = body.results.map((r) => r.embedding);
      state.similarity = theirs ? cosine(mine, theirs) : null;
      renderEmbedding(mine);
      if (theirs && state.model.methods.length) await refreshView();
    } catch (err) {
      if (generation === state.generation) showError(err);
    }
  }

  function cosine(a, b) {
    let dot = 0, na = 0, nb = 0;
    for (let i = 0; i < a.length; i++) {
      dot += a[i] * b[i];
      na += a[i] * a[i];
      nb += b[i] * b[i];
    }
    return dot / Math.sqrt(na * nb);
  }

  function renderEmbedding(vector) {
    const norm = Math.sqrt(vector.reduce((sum, v) => sum + v * v, 0));
    $("embedding-summary").textContent = `Embedding: ${vector.length} numbers, norm ${norm.toFixed(3)}.`;
    const out = $("similarity");
    if (state.similarity === null) {
      $("overlay-caption").textContent = "Pick a reference image (in the Image panel) to see what makes the two similar.";
      return;
    }
    out.textContent = state.similarity.toFixed(4);
    out.dataset.value = String(state.similarity);  // unrounded, for tests and tools
    announce(`Cosine similarity to the reference: ${out.textContent}`);
  }

  function renderPredictions() {
    const list = $("predictions");
    list.replaceChildren(...state.predictions.map((p) => {
      const li = document.createElement("li");
      li.dataset.testid = "prediction";
      li.dataset.index = p.index;
      const b = document.createElement("button");
      b.type = "button";
      b.className = "pred";
      b.setAttribute("aria-pressed", String(p.index === state.selected));
      b.setAttribute("aria-label", `${p.label}: ${(p.score * 100).toFixed(1)}%, explain this class`);
      const label = document.createElement("span");
      label.className = "label";
      label.textContent = p.label;
      const bar = document.createElement("span");
      bar.className = "bar";
      const fill = document.createElement("span");
      fill.style.width = `${Math.max(0.5, p.score * 100)}%`;
      bar.append(fill);
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = `${(p.score * 100).toFixed(1)}%${p.detail ? `, ${p.detail}` : ""}`;
      b.append(label, bar, score);
      b.addEventListener("click", () => selectClass(p.index));
      li.append(b);
      return li;
    }));
  }

  async function selectClass(index) {
    state.selected = index;
    for (const b of $("predictions").querySelectorAll("button.pred")) {
      b.setAttribute("aria-pressed", String(Number(b.parentElement.dataset.index) === index));
    }
    await refreshView();
  }

  // ---- explanations -------------------------------------------------------------------------------------

  // Faithfulness metrics are asked for only when ticked: they cost extra forward passes. A server that
  // lists its metrics in /models is asked for those; otherwise for the families the API documents.
  const DEFAULT_METRICS = ["confidence", "deletion", "insertion"];

  // Both directions in one request: image 0 explained by its similarity to image 1 (the reference), and image
  // 1 by its similarity to image 0. `similar_to` names another image of the same request.
  const PAIR_TARGETS = JSON.stringify([{ similar_to: 1, image: 0 }, { similar_to: 0, image: 1 }]);

  function targetFields() {
    return [["targets", isEmbedding() ? PAIR_TARGETS : String(state.selected)]];
  }

  function explainFields(extra) {
    const fields = [
      ["model", state.model.name],
      // An embedding model has no classes to rank.
      ...(isEmbedding() ? [] : [["top_k", String(Math.min(TOP_K, state.model.num_classes))]]),
      ["layer", $("layer-select").value],
      ["output", "png"],
      ["size", "original"],
      ...extra,
    ];
    if ($("metrics-toggle").checked) {
      const names = Array.isArray(state.model.metrics) && state.model.metrics.length ? state.model.metrics
        : DEFAULT_METRICS;
      fields.push(["metrics", names.join(",")]);
    }
    return fields;
  }

  // The explanations of every image of the request (one list per image), with their heatmaps decoded.
  async function explainImages(fields) {
    const started = performance.now();
    const body = await (await api("/explain", { method: "POST", body: formFor(fields) })).json();
    state.lastMs = performance.now() - started;
    return Promise.all(body.results.map((result) => Promise.all(
      result.explanations.map(async (e) => ({ ...e, levels: await decodeLevels(e.heatmap) })))));
  }

  // The explanations of the image (an embedding's reference, image 1, is only there to be compared with).
  async function explain(fields) {
    return (await explainImages(fields))[0];
  }

  async function decodeLevels(heatmap) {
    const img = new Image();
    img.src = `data:image/png;base64,${heatmap.data}`;
    await img.decode();
    const c = document.createElement("canvas");
    c.width = heatmap.width;
    c.height = heatmap.height;
    const ctx = c.getContext("2d");
    ctx.drawImage(img, 0, 0);
    const rgba = ctx.getImageData(0, 0, c.width, c.height).data;
    const levels = new Uint8Array(c.width * c.height);
    for (let i = 0; i < levels.length; i++) levels[i] = rgba[i * 4];
    return levels;
  }

  function clearViews() {
    state.shown = [];
    state.single = null;
    const overlay = $("overlay");
    overlay.width = 1;
    overlay.height = 1;
    overlay.hidden = true;
    $("overlay-caption").textContent = "Pick an image to see where the model looked.";
    $("metrics").hidden = true;
    $("metrics").replaceChildren();
    $("download").disabled = true;
    $("reference-figure").hidden = true;
    $("similarity").textContent = "none";
    delete $("similarity").dataset.value;
    $("embedding-summary").textContent = "";
    $("view-compare").replaceChildren();
    $("view-classes").replaceChildren();
  }

  function refreshView() {
    return tracked(updateView);
  }

  // Something to explain: a chosen class, detection or segment, or for an embedding model a reference image.
  function hasTarget() {
    return isEmbedding() ? state.reference !== null : state.selected !== null;
  }

  async function updateView() {
    if (!state.image || !hasTarget() || !state.model.methods.length) return;
    const generation = ++state.generation;
    const stillCurrent = () => generation === state.generation;
    try {
      if (state.view === "single") await showSingle(stillCurrent);
      else if (state.view === "compare") await showCompare(stillCurrent);
      else await showClasses(stillCurrent);
      if (stillCurrent()) showError(null);
    } catch (err) {
      if (stillCurrent()) showError(err);
    }
  }

  async function showSingle(stillCurrent) {
    const method = $("method-select").value;
    const fields = explainFields([...targetFields(), ["method", method]]);
    showCurl([curlFor("/explain", fields)]);
    const [[e], theirs] = await explainImages(fields);
    if (!stillCurrent()) return;
    const canvas = $("overlay");
    canvas.hidden = false;
    state.shown = [shownItem(canvas, e, state.pixels)];
    canvas.dataset.target = JSON.stringify(e.target || null);  // what the map explains, for tests and tools
    state.single = { label: e.label, method: e.method };
    const details = `${e.method} on ${e.layer}, ${e.heatmap.width}x${e.heatmap.height}, ` +
      `answered in ${Math.round(state.lastMs)} ms`;
    if (theirs) {
      $("overlay-caption").textContent =
        `The image (${state.image.name}), by its likeness to the reference: ${scoreText(e)}, ${details}`;
      showReferenceMap(theirs[0]);
    } else {
      $("overlay-caption").textContent = `${scoreText(e)}, ${details}`;
    }
    renderMetrics($("metrics"), e.metrics);
    $("download").disabled = false;
    blendAll();
  }

  // The converse of an embedding's map: what in the reference makes it similar to the image.
  function showReferenceMap(e) {
    const canvas = $("overlay-reference");
    state.shown.push(shownItem(canvas, e, state.reference.pixels));
    canvas.dataset.target = JSON.stringify(e.target || null);
    $("overlay-reference-caption").textContent =
      `The reference (${state.reference.name}), by its likeness to the image: ${scoreText(e)}`;
    $("reference-figure").hidden = false;
  }

  // A similarity is a cosine, from -1 to 1; a class's, detection's or segment's score a probability.
  function scoreText(e) {
    return e.target?.kind === "similarity" ? `similarity ${e.score.toFixed(4)}`
      : `${e.label} (${(e.score * 100).toFixed(1)}%)`;
  }

  // A heatmap on screen, over the pixels of the image it explains, with what it explains drawn on it.
  function shownItem(canvas, e, pixels) {
    return { canvas, levels: e.levels, width: e.heatmap.width, height: e.heatmap.height, target: e.target, pixels };
  }

  async function showCompare(stillCurrent) {
    // The API takes one method per request; the server batches these together.
    const methods = state.model.methods;
    const requests = methods.map((m) => explainFields([...targetFields(), ["method", m]]));
    showCurl(requests.map((f) => curlFor("/explain", f)));
    const answers = await Promise.all(requests.map((f) => explain(f)));
    if (!stillCurrent()) return;
    fillGrid($("view-compare"), answers.map(([e]) => ({ e, title: e.method })));
  }

  async function showClasses(stillCurrent) {
    const targets = state.predictions.map((p) => p.index).join(",");
    const fields = explainFields([["targets", targets], ["method", $("method-select").value]]);
    showCurl([curlFor("/explain", fields)]);
    const explanations = await explain(fields);
    if (!stillCurrent()) return;
    fillGrid($("view-classes"), explanations.map((e) => ({ e, title: `${e.label} ${(e.score * 100).toFixed(1)}%` })));
  }

  function fillGrid(grid, items) {
    state.shown = [];
    grid.replaceChildren(...items.map(({ e, title }) => {
      const fig = document.createElement("figure");
      const canvas = document.createElement("canvas");
      canvas.setAttribute("role", "img");
      canvas.setAttribute("aria-label", `${e.label} under ${e.method}`);
      canvas.dataset.testid = "grid-overlay";
      canvas.dataset.target = JSON.stringify(e.target || null);
      const cap = document.createElement("figcaption");
      cap.textContent = title;
      const metrics = document.createElement("dl");
      metrics.className = "metrics";
      renderMetrics(metrics, e.metrics);
      fig.append(canvas, cap, metrics);
      state.shown.push(shownItem(canvas, e, state.pixels));
      return fig;
    }));
    blendAll();
  }

  // Faithfulness metrics appear on explanations when the server computes them; absent otherwise.
  function renderMetrics(dl, metrics) {
    dl.replaceChildren();
    const entries = flatten(metrics, "");
    for (const [name, value] of entries) {
      const dt = document.createElement("dt");
      dt.textContent = name;
      const dd = document.createElement("dd");
      dd.textContent = formatValue(value);
      dl.append(dt, dd);
    }
    dl.hidden = entries.length === 0;
  }

  // {deletion: {auc: 0.2, steps: 16}} -> [["deletion.auc", 0.2], ["deletion.steps", 16]]
  function flatten(value, prefix) {
    if (!value || typeof value !== "object" || Array.isArray(value)) return prefix ? [[prefix, value]] : [];
    return Object.entries(value).flatMap(([k, v]) => flatten(v, prefix ? `${prefix}.${k}` : k));
  }

  function formatValue(value) {
    if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toFixed(3);
    if (typeof value === "boolean") return value ? "yes" : "no";
    return typeof value === "string" ? value : JSON.stringify(value);
  }

  // ---- blending -------------------------------------------------------------------------------------------

  function blendAll() {
    for (const item of state.shown) blend(item);
  }

  function blend({ canvas, levels, width, height, target, pixels }) {
    const alpha = Number($("opacity").value);
    const lut = state.colormaps[$("colormap-select").value];
    canvas.width = width;
    canvas.height = height;
    const ctx = canvas.getContext("2d");
    const out = ctx.createImageData(width, height);
    const base = baseImage(pixels, width, height);
    for (let i = 0, j = 0; i < levels.length; i++, j += 4) {
      const c = lut[levels[i]];
      // Same formula as the server's output=overlay: (1 - alpha) * image + alpha * colour.
      out.data[j] = Math.round((1 - alpha) * base[j] + alpha * c[0]);
      out.data[j + 1] = Math.round((1 - alpha) * base[j + 1] + alpha * c[1]);
      out.data[j + 2] = Math.round((1 - alpha) * base[j + 2] + alpha * c[2]);
      out.data[j + 3] = 255;
    }
    ctx.putImageData(out, 0, 0);
    if (target) drawTarget(ctx, target, width, height);
  }

  // What a detection's or a segment's map explains, drawn as the server's overlay draws it: the box with its
  // label, or the outline of the class's predicted region (the maps are at the upload's size).
  const MARK = "#ff00ff";

  function drawTarget(ctx, target, width, height) {
    if (target.box) {
      // Every detection found, thin and dashed with its label and score; the explained one in MARK below.
      ctx.save();
      ctx.setLineDash([4, 3]);
      ctx.lineWidth = 1;
      ctx.strokeStyle = ctx.fillStyle = "#ffffff";
      ctx.font = "11px sans-serif";
      for (const d of state.predictions) {
        if (!d.box || d.index === target.detection) continue;
        const [a, b, c, e] = d.box;
        ctx.strokeRect(a, b, c - a, e - b);
        ctx.fillText(`${d.label} ${(d.score * 100).toFixed(0)}%`, a + 2, e - 3);
      }
      ctx.restore();
      const [x0, y0, x1, y1] = target.box;
      ctx.strokeStyle = MARK;
      ctx.lineWidth = 2;
      ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
      ctx.fillStyle = MARK;
      ctx.font = "12px sans-serif";
      ctx.fillText(String(target.label ?? ""), x0 + 2, y0 > 14 ? y0 - 4 : y0 + 14);
      return;
    }
    const mask = state.mask;
    if (target.kind !== "segment" || !mask || mask.length !== width * height) return;
    const cls = target.index;  // the map's own class: a grid shows several
    const img = ctx.getImageData(0, 0, width, height);
    const inside = (x, y) => x >= 0 && y >= 0 && x < width && y < height && mask[y * width + x] === cls;
    for (let y = 0; y < height; y++) {
      for (let x = 0; x < width; x++) {
        if (!inside(x, y)) continue;
        if (inside(x - 1, y) && inside(x + 1, y) && inside(x, y - 1) && inside(x, y + 1)) continue;
        const j = (y * width + x) * 4;
        img.data[j] = 255; img.data[j + 1] = 0; img.data[j + 2] = 255;
      }
    }
    ctx.putImageData(img, 0, 0);
  }

  function baseImage(px, width, height) {
    if (px && px.width === width && px.height === height) return px.data;
    // The browser could not decode the image, or it differs in size: blend over mid grey.
    return new Uint8ClampedArray(width * height * 4).fill(128);
  }

  // ---- controls ---------------------------------------------------------------------------------------------

  function setView(view) {
    showTab(view);
    refreshView();
  }

  function showTab(view) {
    state.view = view;
    for (const tab of document.querySelectorAll(".tab")) tab.setAttribute("aria-pressed", String(tab.dataset.view === view));
    for (const v of ["single", "compare", "classes"]) $(`view-${v}`).hidden = v !== view;
    state.shown = [];
  }

  function download() {
    const { label, method } = state.single || {};
    $("overlay").toBlob((blob) => {
      const a = document.createElement("a");
      a.href = URL.createObjectURL(blob);
      a.download = `${state.model.name}-${label}-${method}.png`.replace(/[^\w.+-]/g, "_");
      a.click();
      setTimeout(() => URL.revokeObjectURL(a.href), 1000);
    }, "image/png");
  }

  function firstImage(items) {
    for (const item of items || []) {
      const file = item.getAsFile ? item.getAsFile() : item;
      if (file && file.type.startsWith("image/")) return file;
    }
    return null;
  }

  function wire() {
    $("model-select").addEventListener("change", (ev) => {
      setModel(ev.target.value);
      if (state.image) setImage(state.image);
    });
    $("file-input").addEventListener("change", (ev) => {
      const file = ev.target.files[0];
      if (file) setImage({ blob: file, name: file.name || "image.png" });
    });
    $("reference-input").addEventListener("change", (ev) => {
      const file = ev.target.files[0];
      if (file) setReference({ blob: file, name: file.name || "reference.png" });
    });
    $("reference-clear").addEventListener("click", async () => {
      $("reference-input").value = "";
      // The button disables itself: keep keyboard focus in the panel rather than losing it to the page.
      $("reference-input").focus();
      await setReference(null);
    });
    const drop = $("drop");
    drop.addEventListener("dragover", (ev) => {
      ev.preventDefault();
      drop.classList.add("over");
    });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (ev) => {
      ev.preventDefault();
      drop.classList.remove("over");
      const file = firstImage(ev.dataTransfer.files);
      if (file) setImage({ blob: file, name: file.name || "dropped.png" });
    });
    drop.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" || ev.key === " ") {
        ev.preventDefault();
        $("file-input").click();
      }
    });
    document.addEventListener("paste", (ev) => {
      const file = firstImage(ev.clipboardData && ev.clipboardData.items);
      if (file) setImage({ blob: file, name: "pasted.png" });
    });
    $("method-select").addEventListener("change", () => refreshView());
    $("layer-select").addEventListener("change", () => refreshView());
    $("metrics-toggle").addEventListener("change", () => refreshView());
    $("colormap-select").addEventListener("change", blendAll);
    $("opacity").addEventListener("input", () => {
      $("opacity-value").textContent = Number($("opacity").value).toFixed(2);
      blendAll();
    });
    for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => setView(tab.dataset.view));
    $("download").addEventListener("click", download);
    $("overlay").addEventListener("click", (ev) => {
      // On a detector's overlay, a click on a box explains that detection (the smallest box under it).
      const canvas = ev.currentTarget;
      const rect = canvas.getBoundingClientRect();
      const x = ((ev.clientX - rect.left) * canvas.width) / rect.width;
      const y = ((ev.clientY - rect.top) * canvas.height) / rect.height;
      const hits = state.predictions.filter((d) => d.box && d.box[0] <= x && x <= d.box[2] && d.box[1] <= y && y <= d.box[3]);
      hits.sort((a, b) => (a.box[2] - a.box[0]) * (a.box[3] - a.box[1]) - (b.box[2] - b.box[0]) * (b.box[3] - b.box[1]));
      if (hits.length) selectClass(hits[0].index);
    });
    $("copy-curl").addEventListener("click", async () => {
      try {
        await navigator.clipboard.writeText($("curl").textContent);
        $("copy-status").textContent = "Copied.";
      } catch (_) {
        // Clipboard access needs a secure context; select the text so Ctrl+C works instead.
        getSelection().selectAllChildren($("curl"));
        $("copy-status").textContent = "Selected: press Ctrl+C to copy.";
      }
    });
    $("key-form").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      sessionStorage.setItem(KEY_STORAGE, $("key-input").value.trim());
      $("key-input").value = "";
      await start();
    });
  }

  function start() {
    return tracked(load);
  }

  async function load() {
    try {
      await Promise.all([loadColormaps(), loadSamples()]);
      await loadModels();
      showError(null);
      $("key-form").hidden = !apiKey();
      page.ready = true;
      if (state.image) await setImage(state.image);
    } catch (err) {
      showError(err);
    }
  }

  wire();
  start();
})();

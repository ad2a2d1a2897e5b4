// The sdxl web UI: plain JavaScript, no build step.
//
// It talks only to the native API of the same server: GET /info fills the form, POST /jobs queues a
// generation, /ws/jobs/{id} streams progress and previews, GET /jobs?status=done fills the gallery.
// With an API key, the key is sent as a header on fetch() and stored in a SameSite=Strict cookie, so that
// <img src="/images/..."> and the websocket (which cannot carry headers) are authorised too.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  info: null,
  current: null, // id of the job whose progress is shown
  events: [], // every websocket event received (kept for debugging and tests)
};
window.sdxl = state;

// ------------------------------------------------------------------------------------------ API
function apiKey() {
  return localStorage.getItem("sdxl_api_key") || "";
}

function setApiKey(key) {
  if (key) {
    localStorage.setItem("sdxl_api_key", key);
    document.cookie = "sdxl_api_key=" + encodeURIComponent(key) + "; path=/; SameSite=Strict";
  } else {
    localStorage.removeItem("sdxl_api_key");
    document.cookie = "sdxl_api_key=; path=/; max-age=0; SameSite=Strict";
  }
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (apiKey()) headers["X-API-Key"] = apiKey();
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, Object.assign({}, options, { headers }));
  let data = null;
  try {
    data = await response.json();
  } catch (e) {
    data = null;
  }
  if (!response.ok) {
    if (response.status === 401) $("key-box").open = true;
    throw new Error(describeError(response.status, data));
  }
  return data;
}

function describeError(status, data) {
  let detail = data && data.detail;
  if (Array.isArray(detail)) {
    // FastAPI validation errors: [{loc: [...], msg}, ...]
    detail = detail.map((d) => (d.loc || []).slice(1).join(".") + ": " + d.msg).join("; ");
  }
  return "HTTP " + status + (detail ? ": " + detail : "");
}

function showError(message) {
  $("error").textContent = message || "";
}

// ------------------------------------------------------------------------------------------ form
function option(value, label) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = label;
  return o;
}

function gcd(a, b) {
  return b ? gcd(b, a % b) : a;
}

function fillForm(info) {
  const d = info.defaults;
  $("model-name").textContent = info.model
    ? info.model.name + " (" + info.model.kind + ", " + info.model.sample_size + " px)"
    : "no default model";
  for (const s of info.samplers) $("sampler").append(option(s.id, s.label + " (" + s.id + ")"));
  for (const s of info.schedules) $("schedule").append(option(s.id, s.label));
  const presets = $("size-preset");
  presets.append(option("", "custom"));
  for (const s of info.sizes) {
    const g = gcd(s.width, s.height);
    presets.append(option(s.width + "x" + s.height,
      s.width + " × " + s.height + "  (" + s.width / g + ":" + s.height / g + ")"));
  }
  // refiner checkpoints only ("default" is the shipped refiner, offered with the shipped base model)
  for (const m of info.refiners) $("refiner").append(option(m, m === "default" ? "default (shipped)" : m));
  $("sampler").value = d.sampler;
  $("schedule").value = d.schedule;
  $("steps").value = d.steps;
  $("cfg").value = d.cfg;
  $("refiner_switch").value = d.refiner_switch;
  $("refiner_switch_out").textContent = d.refiner_switch;
  setSize(d.width, d.height);
}

function setSize(width, height) {
  $("width").value = width;
  $("height").value = height;
  const key = width + "x" + height;
  const presets = $("size-preset");
  presets.value = Array.from(presets.options).some((o) => o.value === key) ? key : "";
}

function addLoraRow(name, weight) {
  const row = document.createElement("div");
  row.className = "row lora";
  const select = document.createElement("select");
  for (const l of state.info.loras) select.append(option(l, l));
  if (name) select.value = name;
  const w = document.createElement("input");
  w.type = "number";
  w.step = "0.05";
  w.value = weight === undefined ? 1 : weight;
  const remove = document.createElement("button");
  remove.type = "button";
  remove.textContent = "×";
  remove.title = "remove";
  remove.onclick = () => row.remove();
  row.append(select, w, remove);
  $("loras").append(row);
}

function numberOrNull(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

function readForm() {
  const refiner = $("refiner").value;
  const loras = Array.from(document.querySelectorAll("#loras .lora")).map((row) => ({
    name: row.querySelector("select").value,
    weight: Number(row.querySelector("input").value),
  }));
  return {
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value.trim() ? $("negative_prompt").value : null,
    width: numberOrNull("width"),
    height: numberOrNull("height"),
    sampler: $("sampler").value,
    schedule: $("schedule").value,
    steps: numberOrNull("steps"),
    cfg: numberOrNull("cfg"),
    seed: numberOrNull("seed"),
    batch: numberOrNull("batch") || 1,
    pag_scale: numberOrNull("pag_scale") || 0,
    freeu: $("freeu").checked,
    eta: numberOrNull("eta"),
    hires_scale: numberOrNull("hires_scale") || 0,
    hires_upscaler: $("hires_upscaler").value,
    hires_strength: numberOrNull("hires_strength") ?? 0.7,
    hires_steps: numberOrNull("hires_steps") || 0,
    refiner: refiner || null,
    refiner_switch: Number($("refiner_switch").value),
    loras: loras.filter((l) => l.name),
  };
}

// Region masks for a prompt split by AND: one image per part, in file-name order, as data: URLs.
async function readMasks() {
  const files = Array.from($("region_masks").files || []).sort((a, b) => a.name.localeCompare(b.name));
  return Promise.all(files.map((file) => new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error("cannot read " + file.name));
    reader.readAsDataURL(file);
  })));
}

// The control section: one unit when an image and a model are chosen; the image goes as a data: URL.
async function readControls() {
  const file = ($("control_image").files || [])[0];
  const model = $("control_model").value;
  if (!file && !model) return [];
  if (!file) throw new Error("Control: choose a control image for the model " + model);
  if (!model) throw new Error("Control: choose a model for the control image (the server's ControlNet folder)");
  const image = await new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error("cannot read " + file.name));
    reader.readAsDataURL(file);
  });
  return [{
    model,
    image,
    weight: numberOrNull("control_weight") ?? 1,
    start: numberOrNull("control_start") ?? 0,
    end: numberOrNull("control_end") ?? 1,
    control_mode: $("control_mode").value,
    resize_mode: $("control_resize").value,
    preprocessor: $("control_preprocessor").value,
    control_type: $("control_type").value.trim() || null,
  }];
}

// The control models the server has ("name [hash]" as sd-webui-controlnet lists them; requests use name).
async function loadControlModels() {
  const select = $("control_model");
  try {
    const data = await api("/controlnet/model_list");
    for (const title of data.model_list || []) {
      select.append(option(title.replace(/ \[[0-9a-f]+\]$/, ""), title));
    }
  } catch (e) {
    select.title = "cannot list control models: " + e.message;
  }
}

// "Reuse these settings": put a finished job's request back into the form, with the image's own seed.
function reuse(request, seed) {
  $("prompt").value = request.prompt || "";
  $("negative_prompt").value = request.negative_prompt || "";
  setSize(request.width, request.height);
  $("sampler").value = request.sampler;
  $("schedule").value = request.schedule;
  $("steps").value = request.steps;
  $("cfg").value = request.cfg;
  $("seed").value = seed === undefined || seed === null ? request.seed : seed;
  $("batch").value = 1;
  $("pag_scale").value = request.pag_scale || 0;
  $("freeu").checked = Boolean(request.freeu);
  $("eta").value = request.eta === undefined || request.eta === null ? "" : request.eta;
  $("hires_scale").value = request.hires_scale || 0;
  $("hires_upscaler").value = request.hires_upscaler || "Latent";
  $("hires_strength").value = request.hires_strength ?? 0.7;
  $("hires_steps").value = request.hires_steps || 0;
  $("refiner").value = request.refiner || "";
  $("refiner_switch").value = request.refiner_switch;
  $("refiner_switch_out").textContent = request.refiner_switch;
  $("loras").replaceChildren();
  for (const l of request.loras || []) addLoraRow(l.name, l.weight);
  const unit = (request.controls || [])[0]; // its image cannot be put back: choose the file again
  if (unit) {
    $("control_model").value = unit.model;
    $("control_weight").value = unit.weight;
    $("control_start").value = unit.start;
    $("control_end").value = unit.end;
    $("control_mode").value = unit.control_mode;
    $("control_resize").value = unit.resize_mode;
    $("control_preprocessor").value = unit.preprocessor;
    $("control_type").value = unit.control_type || "";
  }
  window.scrollTo({ top: 0, behavior: "smooth" });
}

// ------------------------------------------------------------------------------------------ progress
function showProgress(fraction, text) {
  const pct = Math.round(Math.max(0, Math.min(1, fraction)) * 100);
  $("progress-bar").style.width = pct + "%";
  $("progress").dataset.progress = String(fraction);
  $("progress-text").textContent = text;
}

function setBusy(busy) {
  $("cancel").disabled = !busy;
}

function finished(job) {
  setBusy(false);
  if (job.status === "done") {
    showProgress(1, "done: " + job.images.length + " image(s)");
    if (job.images.length) $("preview").src = job.images[0].url; // the result replaces the preview
    addJobToGallery(job, true);
  } else if (job.status === "failed") {
    showProgress(0, "failed");
    showError(job.error);
  } else {
    showProgress(job.progress || 0, job.status);
    if (job.images && job.images.length) addJobToGallery(job, true);
  }
}

function handleEvent(id, event) {
  state.events.push(event);
  if (id !== state.current) return;
  if (event.type === "progress") {
    const stage = event.stage === "refiner" ? "refiner " : "";
    const iter = event.n_iter > 1 ? " (batch " + (event.iteration + 1) + "/" + event.n_iter + ")" : "";
    showProgress(event.progress, stage + "step " + event.step + "/" + event.total + iter);
    if (event.preview) {
      $("preview").src = event.preview;
      $("preview").hidden = false;
    }
  } else if (event.type === "status") {
    const job = event.job;
    if (job.status === "queued") {
      const pos = job.queue_position;
      showProgress(0, "queued" + (pos !== null && pos !== undefined ? " (" + pos + " ahead)" : ""));
    } else if (job.status === "running") {
      showProgress(job.progress, "running");
    }
  } else if (event.type === "finished") {
    finished(event.job);
  } else if (event.type === "error") {
    showError(event.detail);
  }
}

function watch(id) {
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  const ws = new WebSocket(scheme + location.host + "/ws/jobs/" + id);
  let ended = false;
  ws.onmessage = (m) => {
    const event = JSON.parse(m.data);
    if (event.type === "finished") ended = true;
    handleEvent(id, event);
  };
  ws.onclose = () => {
    if (!ended) poll(id); // websocket refused or dropped: fall back to polling
  };
}

async function poll(id) {
  try {
    const job = await api("/jobs/" + id);
    if (["done", "failed", "cancelled"].includes(job.status)) {
      handleEvent(id, { type: "finished", job: job });
      return;
    }
    handleEvent(id, { type: "progress", progress: job.progress, step: job.step, total: job.total,
                      stage: job.stage, iteration: job.iteration, n_iter: job.n_iter });
  } catch (e) {
    showError(e.message);
    return;
  }
  setTimeout(() => poll(id), 500);
}

// ------------------------------------------------------------------------------------------ gallery
const shown = new Set();

function addJobToGallery(job, atTop) {
  const gallery = $("gallery");
  const template = $("card-template");
  const cards = [];
  job.images.forEach((image) => {
    if (shown.has(image.name)) return;
    shown.add(image.name);
    const card = template.content.firstElementChild.cloneNode(true);
    card.dataset.job = job.id;
    card.dataset.image = image.name;
    card.querySelector("a").href = image.url;
    card.querySelector("img").src = image.url;
    card.querySelector(".prompt").textContent = job.request.prompt || "(empty prompt)";
    card.querySelector(".info").textContent = image.info;
    card.querySelector(".reuse").onclick = () => reuse(job.request, image.seed);
    cards.push(card);
  });
  if (atTop) gallery.prepend(...cards);
  else gallery.append(...cards);
}

async function loadGallery() {
  const data = await api("/jobs?status=done&limit=60");
  for (const job of data.jobs) addJobToGallery(job, false);
}

// ------------------------------------------------------------------------------------------ workers
// GET /workers: one row per worker (one for the one-process server, one per device with --devices),
// refreshed every few seconds while the panel is open; the summary line always shows the counts.
async function refreshWorkers() {
  let data;
  try {
    data = await api("/workers");
  } catch (e) {
    $("workers-summary").textContent = "(unavailable)";
    return;
  }
  state.workers = data;
  const busy = data.workers.filter((w) => w.busy).length;
  $("workers-summary").textContent =
    "(" + data.workers.length + ", " + busy + " busy, " + data.queued + " queued)";
  const rows = data.workers.map((w) => {
    const tr = document.createElement("tr");
    const loaded = w.loaded || {};
    const stateText = !w.alive ? (w.broken ? "given up" : "restarting") : w.busy ? "busy" : "idle";
    const cells = [w.name, w.device || "", w.pid ?? "", stateText,
      [loaded.model, loaded.refiner].filter(Boolean).join(" + ") || "-",
      (loaded.loras || []).join(", ") || "-", w.jobs_done, w.jobs_failed, w.restarts ?? 0,
      w.current_job ? w.current_job.slice(0, 8) : "-"];
    for (const value of cells) {
      const td = document.createElement("td");
      td.textContent = String(value);
      tr.append(td);
    }
    if (w.last_death) tr.title = w.last_death;
    return tr;
  });
  $("workers").tBodies[0].replaceChildren(...rows);
}

function watchWorkers() {
  refreshWorkers();
  setInterval(() => {
    if ($("workers-panel").open) refreshWorkers();
  }, 3000);
  $("workers-panel").ontoggle = () => {
    if ($("workers-panel").open) refreshWorkers();
  };
}

// ------------------------------------------------------------------------------------------ wiring
async function start() {
  $("api-key").value = apiKey();
  if (apiKey()) setApiKey(apiKey()); // refresh the cookie
  $("key-form").onsubmit = (e) => {
    e.preventDefault();
    setApiKey($("api-key").value.trim());
    location.reload();
  };
  try {
    state.info = await api("/info");
  } catch (e) {
    showError(e.message);
    $("server-status").textContent = "not connected";
    return;
  }
  $("server-status").textContent = "ready";
  fillForm(state.info);
  $("size-preset").onchange = () => {
    const v = $("size-preset").value;
    if (v) {
      const [w, h] = v.split("x").map(Number);
      setSize(w, h);
    }
  };
  $("width").oninput = $("height").oninput = () => setSize(numberOrNull("width"), numberOrNull("height"));
  $("refiner_switch").oninput = () => ($("refiner_switch_out").textContent = $("refiner_switch").value);
  $("add-lora").onclick = () => addLoraRow();
  $("add-lora").disabled = state.info.loras.length === 0;
  $("add-lora").title = state.info.loras.length ? "" : "no LoRA files in the server's LoRA folder";
  $("gen-form").onsubmit = async (e) => {
    e.preventDefault();
    showError("");
    $("generate").disabled = true;
    try {
      const body = readForm();
      body.region_masks = await readMasks();
      body.controls = await readControls();
      const job = await api("/jobs", { method: "POST", body: JSON.stringify(body) });
      state.current = job.id;
      setBusy(true);
      showProgress(0, "queued");
      watch(job.id);
    } catch (err) {
      showError(err.message);
    } finally {
      $("generate").disabled = false;
    }
  };
  $("cancel").onclick = async () => {
    if (!state.current) return;
    try {
      await api("/jobs/" + state.current + "/cancel", { method: "POST" });
    } catch (err) {
      showError(err.message);
    }
  };
  watchWorkers();
  loadControlModels();
  try {
    await loadGallery();
  } catch (e) {
    showError(e.message);
  }
}

start();

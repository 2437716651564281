// The upload page: API key, model choice, uploads with parameters, live progress, before/after,
// recent jobs. Every surface says which model ran and warns when its weights are untrained.
import { Api, ApiProblem, FINAL } from "./api.js";

const KEY_STORAGE = "megasr.apiKey";
const $ = (selector, root = document) => root.querySelector(selector);

const keyInput = $("#api-key");
const fileInput = $("#file-input");
const dropZone = $("#drop-zone");
const form = $("#upload");
const errorBox = $("#error");
const api = new Api(() => keyInput.value);
let chosen = [];

// The key lives in sessionStorage: it survives reloads of this tab, not the tab itself.
keyInput.value = sessionStorage.getItem(KEY_STORAGE) ?? "";
keyInput.addEventListener("change", () => {
  const key = keyInput.value.trim();
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
  loadModels({ restart: true });
  refreshJobList();
});

function showError(message) {
  errorBox.textContent = message;
  errorBox.hidden = !message;
}

function explain(error) {
  return error instanceof ApiProblem ? error.message : `Something went wrong: ${error.message ?? error}`;
}

let thumbUrls = [];

function choose(files) {
  chosen = [...files];
  $("#chosen").textContent = chosen.length
    ? chosen.map((file) => file.name).join(", ")
    : "No files chosen";
  // A thumbnail of each chosen file (object URLs, given back when the choice changes).
  for (const url of thumbUrls) URL.revokeObjectURL(url);
  thumbUrls = chosen.map((file) => URL.createObjectURL(file));
  $("#thumbs").replaceChildren(...chosen.map((file, index) => {
    const image = document.createElement("img");
    image.src = thumbUrls[index];
    image.alt = file.name;
    image.title = file.name;
    return image;
  }));
}

fileInput.addEventListener("change", () => choose(fileInput.files));
for (const type of ["dragenter", "dragover"]) {
  dropZone.addEventListener(type, (event) => {
    event.preventDefault();
    dropZone.classList.add("dragging");
  });
}
for (const type of ["dragleave", "drop"]) {
  dropZone.addEventListener(type, () => dropZone.classList.remove("dragging"));
}
dropZone.addEventListener("drop", (event) => {
  event.preventDefault();
  choose([...event.dataTransfer.files].filter((file) => file.type.startsWith("image/") || !file.type));
});

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  showError("");
  if (!chosen.length) {
    showError("Choose at least one image first.");
    return;
  }
  // Empty fields are not sent (api.submit drops them): the server then applies the chosen
  // model's own defaults for steps and guidance. The model is sent only where there is a choice.
  const params = {
    model: models.length > 1 ? modelSelect.value : "",
    scale: $("#scale").value,
    steps: $("#steps").value,
    guidance_scale: $("#guidance-scale").value,
    seed: $("#seed").value,
    sampler: $("#sampler").value,
    cfg_interval: $("#cfg-interval").value.replace(/\s+/g, ""),
    output_format: $("#output-format").value,
  };
  const button = $("#submit");
  button.disabled = true;
  const problems = [];
  let staleModels = false;
  try {
    for (const file of chosen) {
      try {
        const view = await api.submit(file, params);
        track(view, file);
      } catch (error) {
        problems.push(`${file.name}: ${explain(error)}`);
        if (error instanceof ApiProblem && error.code === "unknown_model") staleModels = true;
      }
    }
  } finally {
    button.disabled = false;
  }
  if (staleModels) loadModels();  // the served models changed since the page asked
  showError(problems.join("\n"));
  refreshJobList();
});

const STATUS_TEXT = {
  queued: "queued",
  running: "running",
  succeeded: "done",
  failed: "failed",
  canceled: "canceled",
};

/** A card for a submitted job, updated live until the job is final. */
function track(view, file) {
  const card = $("#job-template").content.firstElementChild.cloneNode(true);
  card.dataset.jobId = view.id;
  $(".job-name", card).textContent = file.name;
  const beforeUrl = URL.createObjectURL(file);
  const cancel = $(".cancel", card);
  const controller = new AbortController();
  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    try {
      render(card, await api.cancel(view.id));
    } catch (error) {
      showJobError(card, explain(error));
      cancel.disabled = false;
    }
  });
  $("#jobs").prepend(card);
  render(card, view);
  api.follow(view.id, (update) => render(card, update), controller.signal)
    .then((final) => finish(card, final, beforeUrl))
    .catch((error) => showJobError(card, explain(error)));
}

/** A finished job of the list, opened into a card with its compare view (its input fetched back). */
async function reopen(job, button) {
  const existing = document.querySelector(`#jobs .job[data-job-id="${job.id}"]`);
  if (existing) {
    existing.scrollIntoView({ block: "nearest" });
    return;
  }
  button.disabled = true;
  const card = $("#job-template").content.firstElementChild.cloneNode(true);
  card.dataset.jobId = job.id;
  $(".job-name", card).textContent = `job ${job.id.slice(0, 12)}`;
  $("#jobs").prepend(card);
  try {
    const input = await api.input(job.id);
    await finish(card, job, URL.createObjectURL(input));
  } catch (error) {
    render(card, job);
    showJobError(card, explain(error));
  } finally {
    button.disabled = false;
  }
  card.scrollIntoView({ block: "nearest" });
}

function render(card, view) {
  const status = view.status ?? card.dataset.status ?? "queued";
  card.dataset.status = status;
  let text = STATUS_TEXT[status] ?? status;
  if (status === "queued" && Number.isInteger(view.queue_position)) text += ` (position ${view.queue_position + 1})`;
  if (view.cancel_requested) text += ", cancelling…";
  $(".job-status", card).textContent = text;
  const progress = $("progress", card);
  if (typeof view.progress === "number") progress.value = Math.round(view.progress * 100);
  if (status === "succeeded") progress.value = 100;
  $(".job-progress", card).textContent = progressText(card, view, status);
  $(".cancel", card).hidden = FINAL.has(status);
  showJobModel(card, view, status);
}

/** "42% · step 21 / 50 · about 8 s left" while running (while queued, the status line has the
 * queue position). */
function progressText(card, view, status) {
  if (status === "queued") return "";
  const fraction = typeof view.progress === "number" ? view.progress : 0;
  const model = models.find((candidate) => candidate.name === (view.model ?? card.dataset.model));
  const sampler = view.params?.sampler ?? "ddpm";
  const total = view.params?.steps ?? model?.sampler_steps?.[sampler] ?? view.model_info?.default_steps ?? model?.default_steps;
  const parts = [`${Math.round((status === "succeeded" ? 1 : fraction) * 100)}%`];
  if (Number.isInteger(total)) {
    const done = status === "succeeded" ? total : Math.min(total, Math.round(fraction * total));
    parts.push(`step ${done} / ${total}`);
  }
  if (status === "running") {
    // ETA from the progress made since this page first saw the job run.
    const now = performance.now();
    card.firstSeen ??= { time: now, fraction };
    const rate = (fraction - card.firstSeen.fraction) / Math.max(1, now - card.firstSeen.time);
    if (rate > 0 && fraction < 1) parts.push(`about ${Math.max(1, Math.round((1 - fraction) / rate / 1000))} s left`);
  } else if (status === "succeeded" && Number.isFinite(view.metrics?.predict_s)) {
    parts.push(`took ${view.metrics.predict_s.toFixed(1)} s`);
  } else if (status !== "succeeded") {
    return "";
  }
  return parts.join(" · ");
}

/** The card's model line: the model that ran it once known, else the model it was sent to. */
/** " · DPM-Solver++ 2M, guidance on 0–0.6 of the steps" for a job that chose the fast options. */
function samplingNote(params) {
  const parts = [];
  if (params?.sampler && params.sampler !== "ddpm") {
    parts.push($(`#sampler option[value="${params.sampler}"]`)?.textContent.replace(/ \(.*\)$/, "") ?? params.sampler);
  }
  if (Array.isArray(params?.cfg_interval)) parts.push(`guidance on ${params.cfg_interval.join("–")} of the steps`);
  return parts.length ? ` · ${parts.join(", ")}` : "";
}

function showJobModel(card, view, status) {
  if (typeof view.model === "string") card.dataset.model = view.model;
  if (view.model_info && typeof view.model_info === "object") card.modelInfo = view.model_info;
  const info = card.modelInfo;
  const line = $(".job-model", card);
  if (info) {
    line.textContent = `Model: ${ranOn(info)}${samplingNote(view.params)}`;
  } else if (card.dataset.model) {
    line.textContent = `Model: ${modelLabel(card.dataset.model)}${samplingNote(view.params)}${FINAL.has(status) ? "" : " (requested)"}`;
  }
  line.hidden = !line.textContent;
  const untrained = status === "succeeded" && info?.trained === false;
  const mark = $(".job-untrained", card);
  mark.textContent = untrained
    ? `Made by untrained weights (${info.untrained_reason || "no reason given"}): this is not a real super-resolution.`
    : "";
  mark.hidden = !untrained;
  card.classList.toggle("untrained", untrained);
  const title = info?.title || info?.name || "MegaSR";
  $(".after", card).alt = `After (${title} result${untrained ? ", untrained weights" : ""})`;
}

function showJobError(card, message) {
  const box = $(".job-error", card);
  box.textContent = message;
  box.hidden = false;
}

async function finish(card, view, beforeUrl) {
  render(card, view);
  refreshJobList();
  if (models.some((model) => !announced(model))) loadModels();
  if (view.status === "failed") {
    showJobError(card, `The job failed: ${view.error?.message ?? "no reason given"}`);
    return;
  }
  if (view.status !== "succeeded") return;
  let blob;
  try {
    blob = await api.result(view.id);
  } catch (error) {
    showJobError(card, explain(error));
    return;
  }
  const afterUrl = URL.createObjectURL(blob);
  const before = $(".before", card);
  const after = $(".after", card);
  const compare = $(".compare", card);
  const frame = $(".compare-frame", card);
  // The upload is shown at the result's size (scaled up by the browser) so the two line up.
  for (const image of [before, after]) {
    image.width = view.output.width;
    image.height = view.output.height;
  }
  before.src = beforeUrl;
  after.src = afterUrl;
  const slider = $(".compare-slider", card);
  const split = () => frame.style.setProperty("--split", `${slider.value}%`);
  slider.addEventListener("input", split);
  split();
  zoomable(frame, $(".compare-stage", card), after, card);
  const link = $(".download", card);
  link.href = afterUrl;
  const extension = { png: "png", jpeg: "jpg", webp: "webp" }[view.params?.output_format] ?? "png";
  link.download = `${card.querySelector(".job-name").textContent.replace(/\.[^.]*$/, "")}-x${view.params?.scale ?? ""}.${extension}`;
  compare.hidden = false;
}

let listRequests = 0;

async function refreshJobList() {
  const note = $("#job-list-note");
  const table = $("#job-list");
  const body = $("tbody", table);
  const request = ++listRequests;
  let jobs;
  try {
    jobs = await api.recentJobs();
  } catch (error) {
    if (request !== listRequests) return;  // a newer refresh answers instead
    note.textContent = error instanceof ApiProblem && error.status === 401 && !keyInput.value.trim()
      ? "Enter your API key to see your recent jobs." : explain(error);
    note.hidden = false;
    return;
  }
  if (request !== listRequests) return;
  if (jobs === null) {
    note.textContent = "This server has no job list yet.";
    note.hidden = false;
    table.hidden = true;
    return;
  }
  table.hidden = false;
  note.hidden = jobs.length > 0;
  note.textContent = "No jobs yet.";
  body.replaceChildren(...jobs.map((job) => {
    const row = document.createElement("tr");
    row.dataset.jobId = job.id;
    const size = job.output ? `${job.output.width}×${job.output.height}` : `${job.input.width}×${job.input.height}`;
    const id = element("code", job.id.slice(0, 12));
    id.title = job.id;
    const status = cell(job.status);
    if (job.status === "succeeded") {
      const open = element("button", "Open", "small");
      open.type = "button";
      open.dataset.testid = "open-job";
      open.setAttribute("aria-label", `Open job ${job.id.slice(0, 12)} in the compare view`);
      open.addEventListener("click", () => reopen(job, open));
      status.append(" ", open);
    }
    row.append(cell(id), status, modelCell(job), cell(size),
               cell(new Date(job.created_at).toLocaleString()));
    return row;
  }));
}

function element(tag, text, className) {
  const node = document.createElement(tag);
  node.textContent = text;
  if (className) node.className = className;
  return node;
}

function cell(content) {
  const node = document.createElement("td");
  node.append(content);
  return node;
}

/** A job's model in the list: the one that ran it (marked when untrained), else the one asked for. */
function modelCell(job) {
  const node = cell(job.model_info ? ranOn(job.model_info) : job.model ? modelLabel(job.model) : "—");
  node.className = "model-cell";
  node.dataset.testid = "job-list-model";
  if (job.model_info?.trained === false) {
    const badge = element("span", "untrained", "badge warning");
    badge.title = job.model_info.untrained_reason || "untrained weights";
    node.append(" ", badge);
  }
  return node;
}

// ---- Models: GET /v1/models, the selector, the untrained-weights banner, the defaults ----

const modelSelect = $("#model-select");
const modelChoice = $("#model-choice");
const modelInfo = $("#model-info");
const banner = $("#untrained-banner");
/** The served models as the server last listed them; empty when unknown (the page then sends no model). */
let models = [];
let modelRequests = 0;
const modelRetry = { timer: 0, delay: 3000 };

/** Whether a worker of this model has announced its identity (weights, whether trained, defaults). */
function announced(model) {
  return typeof model.trained === "boolean";
}

/** "SeeSR (fast)": a served model's title and name; one of them where they differ only in case. */
function modelLabel(name) {
  const title = models.find((candidate) => candidate.name === name)?.title;
  if (!title) return name;
  return title.toLowerCase() === name.toLowerCase() ? title : `${title} (${name})`;
}

/** "SeeSR · weights tiny-seesr" (" · fp8" when its linear layers ran in float8): what a model_info says ran. */
function ranOn(info) {
  const title = info.title || info.name || "unknown model";
  const fp8 = info.precision === "fp8" ? " · fp8" : "";
  return info.weights ? `${title} · weights ${info.weights}${fp8}` : `${title}${fp8}`;
}

function chosenModel() {
  if (models.length > 1) return models.find((model) => model.name === modelSelect.value) ?? null;
  return models[0] ?? null;
}

async function loadModels({ restart = false } = {}) {
  const request = ++modelRequests;
  clearTimeout(modelRetry.timer);
  if (restart) modelRetry.delay = 3000;
  let list;
  let problem = null;
  try {
    list = await api.models();
  } catch (error) {
    problem = error;
  }
  if (request !== modelRequests) return;  // a newer request answers instead
  models = list ?? [];
  showModels(list === null ? "none" : problem);
  // Until every model's worker has announced itself, ask again now and then (backing off).
  if (!problem && models.some((model) => !announced(model))) {
    modelRetry.timer = setTimeout(loadModels, modelRetry.delay);
    modelRetry.delay = Math.min(modelRetry.delay * 2, 60_000);
  }
}

/** The selector (several models), the model line, the banner and the defaults for the models now known. */
function showModels(problem) {
  const previous = modelSelect.value;
  if (models.length > 1) {
    modelSelect.replaceChildren(...models.map((model) => {
      const option = element("option", modelLabel(model.name) + (model.trained === false ? " — untrained" : ""));
      option.value = model.name;
      return option;
    }));
    const fallback = models.find((model) => model.default) ?? models[0];
    modelSelect.value = models.some((model) => model.name === previous) ? previous : fallback.name;
  } else {
    modelSelect.replaceChildren();
  }
  modelChoice.hidden = models.length < 2;
  if (problem === "none") {
    modelInfo.textContent = "This server does not list its models; uploads use its default model.";
  } else if (problem) {
    modelInfo.textContent = problem instanceof ApiProblem && problem.status === 401 && !keyInput.value.trim()
      ? "Enter your API key to see which models this server runs."
      : `The list of models is unavailable (${explain(problem)}); uploads use the server's default model.`;
  }
  showChosenModel(problem ? null : undefined);
}

/** The line about the chosen model, the untrained-weights banner and the parameter placeholders. */
function showChosenModel(fixedText) {
  const model = chosenModel();
  if (fixedText === undefined) {
    let text = "";
    if (model) {
      const prefix = models.length > 1 ? "" : `Model: ${modelLabel(model.name)} · `;
      text = announced(model)
        ? `${prefix}weights ${model.weights ?? "unknown"}${model.dtype ? ` (${model.dtype}${model.precision === "fp8" ? ", fp8 linear layers" : ""})` : ""}` +
          (model.trained ? " · trained" : " · untrained")
        : `${prefix}no worker has announced this model yet, so its weights are not known`;
    }
    modelInfo.textContent = text;
  }
  modelInfo.hidden = !modelInfo.textContent;

  // The banner is an alert: rewritten only when what it says changes, so it is announced once.
  const untrained = model?.trained === false;
  const reason = (model?.untrained_reason || "no reason given").replace(/[.\s]+$/, "");
  const warning = untrained
    ? ` ${model.title || model.name}${model.weights ? ` (${model.weights})` : ""} is not trained: ${reason}. ` +
      "Its results are not a real super-resolution."
    : "";
  if (banner.dataset.warning !== warning) {
    banner.dataset.warning = warning;
    banner.replaceChildren(...(untrained ? [element("strong", "Untrained weights."), warning] : []));
  }
  banner.hidden = !untrained;

  const steps = model?.sampler_steps?.[$("#sampler").value] ?? model?.default_steps;
  const guidance = model?.default_guidance_scale;
  $("#steps").placeholder = Number.isFinite(steps) ? `${steps} (default)` : "model default";
  $("#guidance-scale").placeholder = Number.isFinite(guidance) ? `${guidance} (default)` : "model default";
}

modelSelect.addEventListener("change", () => showChosenModel());
$("#sampler").addEventListener("change", () => showChosenModel());

$("#refresh").addEventListener("click", () => {
  refreshJobList();
  loadModels({ restart: true });
});
/** Without a key typed in: if the job list answers anyway, this server takes no keys (anonymous
 * mode, as `megasr serve` on a laptop), so the page hides the key field and shows the jobs. */
async function detectAnonymous() {
  let jobs;
  try {
    jobs = await api.recentJobs();
  } catch {
    return;  // 401: keys are needed (the field stays); anything else: nothing to conclude
  }
  if (jobs === null || keyInput.value.trim()) return;
  $("#key-box").hidden = true;
  refreshJobList();
}

loadModels();
if (keyInput.value.trim()) refreshJobList();
else detectAnonymous();

// ---- The compare view's zoom and pan: wheel or pinch to zoom, drag to pan, Fit and 100 % ----

/** Zoom and pan ``stage`` inside ``frame`` (a CSS transform; the frame clips). 100 % shows the
 * result at its full resolution: one image pixel per CSS pixel. */
function zoomable(frame, stage, image, card) {
  const view = { zoom: 1, x: 0, y: 0 };
  const pointers = new Map();
  let pinch = null;

  function apply() {
    const width = frame.clientWidth;
    const height = frame.clientHeight;
    view.zoom = Math.min(Math.max(view.zoom, 1), 16);
    view.x = Math.min(0, Math.max(width - width * view.zoom, view.x));
    view.y = Math.min(0, Math.max(height - height * view.zoom, view.y));
    stage.style.setProperty("--zoom", view.zoom);
    stage.style.setProperty("--pan-x", `${view.x}px`);
    stage.style.setProperty("--pan-y", `${view.y}px`);
    frame.classList.toggle("zoomed", view.zoom > 1);
    frame.dataset.zoom = view.zoom.toFixed(3);
  }

  function zoomAt(factor, clientX, clientY) {
    const box = frame.getBoundingClientRect();
    const px = clientX - box.left;
    const py = clientY - box.top;
    const next = Math.min(Math.max(view.zoom * factor, 1), 16);
    view.x = px - ((px - view.x) * next) / view.zoom;
    view.y = py - ((py - view.y) * next) / view.zoom;
    view.zoom = next;
    apply();
  }

  frame.addEventListener("wheel", (event) => {
    event.preventDefault();
    zoomAt(Math.exp(-event.deltaY / 300), event.clientX, event.clientY);
  }, { passive: false });

  frame.addEventListener("pointerdown", (event) => {
    frame.setPointerCapture(event.pointerId);
    pointers.set(event.pointerId, { x: event.clientX, y: event.clientY });
    if (pointers.size === 2) {
      const [a, b] = [...pointers.values()];
      pinch = { distance: Math.hypot(a.x - b.x, a.y - b.y) };
    }
    frame.classList.add("panning");
  });
  frame.addEventListener("pointermove", (event) => {
    const last = pointers.get(event.pointerId);
    if (!last) return;
    const current = { x: event.clientX, y: event.clientY };
    pointers.set(event.pointerId, current);
    if (pointers.size === 2 && pinch) {
      const [a, b] = [...pointers.values()];
      const distance = Math.hypot(a.x - b.x, a.y - b.y);
      zoomAt(distance / pinch.distance, (a.x + b.x) / 2, (a.y + b.y) / 2);
      pinch.distance = distance;
    } else if (pointers.size === 1) {
      view.x += current.x - last.x;
      view.y += current.y - last.y;
      apply();
    }
  });
  for (const type of ["pointerup", "pointercancel"]) {
    frame.addEventListener(type, (event) => {
      pointers.delete(event.pointerId);
      if (pointers.size < 2) pinch = null;
      if (!pointers.size) frame.classList.remove("panning");
    });
  }
  frame.addEventListener("keydown", (event) => {
    const box = frame.getBoundingClientRect();
    const centre = [box.left + box.width / 2, box.top + box.height / 2];
    if (event.key === "+" || event.key === "=") zoomAt(1.25, ...centre);
    else if (event.key === "-") zoomAt(0.8, ...centre);
    else if (event.key === "0") { view.zoom = 1; apply(); }
    else return;
    event.preventDefault();
  });

  $(".zoom-fit", card).addEventListener("click", () => {
    view.zoom = 1;
    apply();
  });
  $(".zoom-full", card).addEventListener("click", () => {
    // one result pixel per CSS pixel, around the centre of the frame
    const box = frame.getBoundingClientRect();
    const factor = (image.naturalWidth || image.width) / Math.max(1, frame.clientWidth) / view.zoom;
    zoomAt(factor, box.left + box.width / 2, box.top + box.height / 2);
  });
  apply();
}

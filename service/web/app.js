// The upload page: API key, uploads with parameters, live progress, before/after, recent jobs.
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
  refreshJobList();
});

function showError(message) {
  errorBox.textContent = message;
  errorBox.hidden = !message;
}

function explain(error) {
  return error instanceof ApiProblem ? error.message : `Something went wrong: ${error.message ?? error}`;
}

function choose(files) {
  chosen = [...files];
  $("#chosen").textContent = chosen.length
    ? chosen.map((file) => file.name).join(", ")
    : "No files chosen";
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
  const params = {
    scale: $("#scale").value,
    steps: $("#steps").value,
    seed: $("#seed").value,
    output_format: $("#output-format").value,
  };
  const button = $("#submit");
  button.disabled = true;
  const problems = [];
  try {
    for (const file of chosen) {
      try {
        const view = await api.submit(file, params);
        track(view, file);
      } catch (error) {
        problems.push(`${file.name}: ${explain(error)}`);
      }
    }
  } finally {
    button.disabled = false;
  }
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
  $(".cancel", card).hidden = FINAL.has(status);
}

function showJobError(card, message) {
  const box = $(".job-error", card);
  box.textContent = message;
  box.hidden = false;
}

async function finish(card, view, beforeUrl) {
  render(card, view);
  refreshJobList();
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
    for (const [text, code] of [[job.id.slice(0, 12), true], [job.status, false], [size, false],
                                [new Date(job.created_at).toLocaleString(), false]]) {
      const cell = document.createElement("td");
      if (code) {
        const element = document.createElement("code");
        element.textContent = text;
        element.title = job.id;
        cell.append(element);
      } else {
        cell.textContent = text;
      }
      row.append(cell);
    }
    return row;
  }));
}

$("#refresh").addEventListener("click", refreshJobList);
if (keyInput.value.trim()) refreshJobList();

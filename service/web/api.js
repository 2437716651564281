// The MegaSR API as the page uses it: Bearer requests, plain-words errors, job progress streams.

/** An API answer that was not a success, worded for people. */
export class ApiProblem extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// What each status means for someone using the page; the API's own message follows it.
const STATUS_WORDS = {
  400: "The image could not be read",
  401: "The API key is missing or wrong",
  404: "Not found",
  409: "Not possible right now",
  413: "The image is too large",
  415: "That file is not a supported image",
  422: "Some of the settings are not accepted",
  429: "Too many requests — please wait a little and try again",
  503: "The service is busy or partly down — please try again shortly",
};

/** A sentence for an error answer: what it means, then the API's own explanation. */
export function describe(status, code, message) {
  const words = STATUS_WORDS[status] ?? (status >= 500 ? "The server had a problem" : "The request failed");
  return message ? `${words}: ${message} (${status})` : `${words} (${status})`;
}

async function problemFrom(response) {
  let code = "http_error";
  let message = "";
  try {
    const body = await response.json();
    code = body?.error?.code ?? code;
    message = body?.error?.message ?? "";
  } catch {
    message = response.statusText;
  }
  return new ApiProblem(response.status, code, describe(response.status, code, message));
}

export class Api {
  /** @param {() => string} getKey the current API key (may be empty) */
  constructor(getKey) {
    this.getKey = getKey;
  }

  headers(extra = {}) {
    const key = this.getKey().trim();
    return key ? { Authorization: `Bearer ${key}`, ...extra } : { ...extra };
  }

  async request(path, options = {}) {
    let response;
    try {
      response = await fetch(path, { ...options, headers: this.headers(options.headers) });
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new ApiProblem(0, "network", "The service cannot be reached — check your connection");
    }
    if (!response.ok) throw await problemFrom(response);
    return response;
  }

  async json(path, options) {
    return (await this.request(path, options)).json();
  }

  /** Queue one image; answers the job view (status 202). */
  submit(file, params) {
    const form = new FormData();
    form.append("image", file, file.name);
    for (const [name, value] of Object.entries(params)) {
      if (value !== "" && value !== null && value !== undefined) form.append(name, String(value));
    }
    return this.json("v1/upscale", { method: "POST", body: form });
  }

  job(id) {
    return this.json(`v1/jobs/${encodeURIComponent(id)}`);
  }

  cancel(id) {
    return this.json(`v1/jobs/${encodeURIComponent(id)}`, { method: "DELETE" });
  }

  /** The result image as a Blob (the link needs the Bearer header, so no plain <img src>). */
  async result(id) {
    return (await this.request(`v1/jobs/${encodeURIComponent(id)}/result`)).blob();
  }

  /** The job's uploaded image (GET /v1/jobs/{id}/input), for a before/after view of an older job. */
  async input(id) {
    return (await this.request(`v1/jobs/${encodeURIComponent(id)}/input`)).blob();
  }

  /**
   * The models this deployment serves (GET /v1/models), or null where the server has no model
   * list (an older API). Each: {name, default, family, title, weights, trained, untrained_reason,
   * default_steps, default_guidance_scale, ...}; the identity fields are null until a worker of
   * that model has announced itself.
   */
  async models() {
    let body;
    try {
      body = await this.json("v1/models");
    } catch (error) {
      if (error instanceof ApiProblem && (error.status === 404 || error.status === 405)) return null;
      throw error;
    }
    const models = Array.isArray(body?.models) ? body.models : [];
    return models.filter((model) => model && typeof model.name === "string" && model.name);
  }

  /** The tenant's recent jobs, or null where the server has no job list. */
  async recentJobs(limit = 20) {
    try {
      return (await this.json(`v1/jobs?limit=${limit}`)).jobs ?? [];
    } catch (error) {
      if (error instanceof ApiProblem && (error.status === 404 || error.status === 405)) return null;
      throw error;
    }
  }

  /**
   * Follow a job until it is final, calling onUpdate(view) as it changes; answers the final view.
   * Reads the server-sent events of /v1/jobs/{id}/events with fetch() (EventSource cannot send
   * the Bearer header); where the server has no event stream (404), polls every 500 ms instead.
   */
  async follow(id, onUpdate, signal) {
    try {
      await this.#stream(id, onUpdate, signal);
    } catch (error) {
      if (signal?.aborted) throw error;
      const noStream = error instanceof ApiProblem && error.status === 404 && error.code !== "job_not_found";
      if (error instanceof ApiProblem && !noStream) throw error;
      // no event stream on this server, or the connection broke: polling below takes over
    }
    // The stream ended (or is not there): poll until the job is final. After a clean stream's
    // final event this is a single request, which also gives the full view (result_url, sizes).
    for (;;) {
      const view = await this.job(id);
      onUpdate(view);
      if (FINAL.has(view.status)) return view;
      await sleep(500, signal);
    }
  }

  async #stream(id, onUpdate, signal) {
    const response = await this.request(`v1/jobs/${encodeURIComponent(id)}/events`, {
      headers: { Accept: "text/event-stream" }, signal,
    });
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = parseEvent(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
        if (event?.data && typeof event.data === "object") {
          onUpdate({ id, ...event.data });
          if (FINAL.has(event.data.status)) {
            await reader.cancel();
            return;
          }
        }
      }
    }
  }
}

export const FINAL = new Set(["succeeded", "failed", "canceled"]);

/** One server-sent event block: {event, data}; data parsed as JSON where it is JSON. */
export function parseEvent(block) {
  let event = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") event = value;
    else if (field === "data") data.push(value);
  }
  if (!data.length) return null;
  const text = data.join("\n");
  try {
    return { event, data: JSON.parse(text) };
  } catch {
    return { event, data: text };
  }
}

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(timer);
      reject(signal.reason);
    }, { once: true });
  });
}

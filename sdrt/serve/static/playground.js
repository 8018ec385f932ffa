// sdrt playground: POST /v1/jobs, then follow the job's server-sent events (read with fetch(), so that an
// Authorization header can go with them) until `done` or `error`. Nothing here talks to any other host.
"use strict";

const config = JSON.parse(document.getElementById("sdrt-config").textContent);
const $ = (id) => document.getElementById(id);
let current = null; // {id, controller} of the job being followed

function setup() {
  $("model").textContent = config.model ? `model: ${config.model}` : "";
  $("width").value = config.width ?? "";
  $("height").value = config.height ?? "";
  for (const id of ["width", "height"]) $(id).step = config.size_multiple;
  $("steps").value = config.steps;
  $("guidance").value = config.guidance;
  if (config.max_steps) $("steps").max = config.max_steps;
  if (config.max_images) $("num_images").max = config.max_images;
  const own = document.createElement("option");
  own.value = "";
  own.textContent = config.default_scheduler ? `model's own (${config.default_scheduler})` : "model's own";
  $("scheduler").append(own);
  for (const name of config.schedulers) {
    const option = document.createElement("option");
    option.value = option.textContent = name;
    $("scheduler").append(option);
  }
  $("api-key-row").hidden = !config.api_key_required;
  $("form").addEventListener("submit", (event) => { event.preventDefault(); generate(); });
  $("cancel").addEventListener("click", cancel);
  setupPainting();
  setupControl();
  checkHealth();
}

// ---- a control picture for one of the engine's ControlNets / T2I-Adapters ------------------------------------
let controlPicture = null; // the chosen picture as a data URL, sent as is (the service resizes it)

function setupControl() {
  const models = config.controlnets || [];
  $("control-none").hidden = models.length > 0;
  $("control-fields").hidden = models.length === 0;
  for (const {name, kind} of models) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = kind === "t2i_adapter" ? `${name} (T2I-Adapter)` : name;
    option.dataset.kind = kind;
    $("control-name").append(option);
  }
  const guessable = () => {
    const adapter = $("control-name").selectedOptions[0]?.dataset.kind === "t2i_adapter";
    $("guess-mode").disabled = adapter;   // guess mode is a ControlNet's
    if (adapter) $("guess-mode").checked = false;
  };
  $("control-name").addEventListener("change", guessable);
  guessable();
  $("control-image").addEventListener("change", () => {
    const file = $("control-image").files[0];
    if (!file) return;
    const reader = new FileReader();
    reader.onload = () => {
      controlPicture = reader.result;
      $("control-preview").src = controlPicture;
      $("control-chosen").hidden = false;
    };
    reader.onerror = () => showError(`${file.name}: the browser cannot read this picture`, "no control picture");
    reader.readAsDataURL(file);
  });
  $("remove-control").addEventListener("click", () => {
    controlPicture = null;
    $("control-image").value = "";
    $("control-preview").removeAttribute("src");
    $("control-chosen").hidden = true;
  });
}

// ---- the picture to change and its mask ------------------------------------------------------------------------
// The mask canvas holds what was painted as translucent red; what is painted (alpha > 0) is white in the mask sent.
const PAINT = "rgba(230, 40, 40, 0.55)";

function setupPainting() {
  $("picture").addEventListener("change", () => {
    const file = $("picture").files[0];
    if (file) loadPicture(file);
  });
  const mask = $("mask-canvas");
  let drawing = false, last = null;
  const at = (event) => {
    const box = mask.getBoundingClientRect();
    return [(event.clientX - box.left) * mask.width / box.width, (event.clientY - box.top) * mask.height / box.height];
  };
  const stroke = (from, to) => {
    const context = mask.getContext("2d");
    context.globalCompositeOperation = $("eraser").checked ? "destination-out" : "source-over";
    context.strokeStyle = $("eraser").checked ? "#000" : PAINT;   // the eraser removes paint wholly
    context.lineWidth = Number($("brush-size").value);
    context.lineCap = context.lineJoin = "round";
    // one path per stroke segment at full strength: overlapping segments must not add up their alpha
    context.globalAlpha = 1;
    context.beginPath();
    context.moveTo(...from);
    context.lineTo(...to);
    context.stroke();
    solidify(context);
  };
  mask.addEventListener("pointerdown", (event) => {
    drawing = true;
    last = at(event);
    mask.setPointerCapture(event.pointerId);
    stroke(last, last);
  });
  mask.addEventListener("pointermove", (event) => {
    if (!drawing) return;
    const point = at(event);
    stroke(last, point);
    last = point;
  });
  for (const end of ["pointerup", "pointercancel"]) mask.addEventListener(end, () => { drawing = false; });
  $("clear-mask").addEventListener("click", () => mask.getContext("2d").clearRect(0, 0, mask.width, mask.height));
  $("invert-mask").addEventListener("click", () => {
    const context = mask.getContext("2d");
    const image = context.getImageData(0, 0, mask.width, mask.height);
    for (let i = 0; i < image.data.length; i += 4) {
      const painted = image.data[i + 3] > 0;
      image.data.set(painted ? [0, 0, 0, 0] : [230, 40, 40, 140], i);
    }
    context.putImageData(image, 0, 0);
  });
  $("remove-picture").addEventListener("click", () => {
    $("picture").value = "";
    $("painting").hidden = true;
  });
}

// Every painted pixel the same translucent red, so that the mask is what was painted, not how often.
function solidify(context) {
  const {width, height} = context.canvas;
  const image = context.getImageData(0, 0, width, height);
  for (let i = 3; i < image.data.length; i += 4) {
    if (image.data[i] > 0) image.data.set([230, 40, 40, 140], i - 3);
  }
  context.putImageData(image, 0, 0);
}

function loadPicture(file) {
  const img = new Image();
  img.onload = () => {
    for (const id of ["picture-canvas", "mask-canvas"]) {
      $(id).width = img.naturalWidth;
      $(id).height = img.naturalHeight;
    }
    $("picture-canvas").getContext("2d").drawImage(img, 0, 0);
    $("mask-canvas").getContext("2d").clearRect(0, 0, img.naturalWidth, img.naturalHeight);
    const m = config.size_multiple || 1;
    $("width").value = img.naturalWidth - img.naturalWidth % m;
    $("height").value = img.naturalHeight - img.naturalHeight % m;
    $("painting").hidden = false;
    URL.revokeObjectURL(img.src);
  };
  img.onerror = () => showError(`${file.name}: the browser cannot read this picture`, "no picture");
  img.src = URL.createObjectURL(file);
}

// The painted mask as a PNG data URL (white: repaint), or null when nothing is painted.
function maskPng() {
  const mask = $("mask-canvas");
  const painted = mask.getContext("2d").getImageData(0, 0, mask.width, mask.height).data;
  const out = document.createElement("canvas");
  out.width = mask.width;
  out.height = mask.height;
  const context = out.getContext("2d");
  const image = context.createImageData(mask.width, mask.height);
  let any = false;
  for (let i = 0; i < painted.length; i += 4) {
    const v = painted[i + 3] > 0 ? 255 : 0;
    any ||= v > 0;
    image.data.set([v, v, v, 255], i);
  }
  context.putImageData(image, 0, 0);
  return any ? out.toDataURL("image/png") : null;
}

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = `Bearer ${key}`;
  return h;
}

async function checkHealth() {
  let ready = false;
  try {
    const r = await fetch("readyz", {cache: "no-store"});
    ready = r.ok;
    $("health").textContent = r.ok ? "ready" : await failureText(r);
  } catch (e) {
    $("health").textContent = `cannot reach the service (${e.message})`;
  }
  $("health").className = ready ? "ready" : "unavailable";
  if (!ready) setTimeout(checkHealth, 5000); // still loading (or gone): look again
}

// The error as the server words it: the message of a JSON error body, else the body's text.
async function failureText(response) {
  const text = await response.text();
  let message = text.trim() || response.statusText;
  try {
    const body = JSON.parse(text);
    message = body?.error?.message ?? body?.detail ?? message;
  } catch (e) { /* not JSON: a proxy's plain-text answer */ }
  const retry = response.headers.get("Retry-After");
  return `${response.status}: ${message}` + (retry ? ` (retry after ${retry} s)` : "");
}

function request() {
  const body = {prompt: $("prompt").value};
  const negative = $("negative_prompt").value.trim();
  if (negative) body.negative_prompt = negative;
  for (const id of ["width", "height", "steps", "num_images", "preview_every"]) {
    if ($(id).value !== "") body[id] = parseInt($(id).value, 10);
  }
  body.guidance = parseFloat($("guidance").value);
  if ($("seed").value !== "") body.seed = parseInt($("seed").value, 10);
  if ($("scheduler").value) body.scheduler = $("scheduler").value;
  if (!$("painting").hidden) {   // a picture to change: img2img, or inpainting where a mask was painted
    body.init_image = $("picture-canvas").toDataURL("image/png");
    const mask = maskPng();
    if (mask) {
      body.mask = mask;
      body.overlay = $("overlay").checked;
    }
    if ($("strength").value !== "") body.strength = parseFloat($("strength").value);
  }
  if (controlPicture) {
    body.controls = [{name: $("control-name").value, image: controlPicture,
                      scale: parseFloat($("control-scale").value), start: parseFloat($("control-start").value),
                      end: parseFloat($("control-end").value)}];
    if ($("guess-mode").checked) body.guess_mode = true;
  }
  return body;
}

function reset() {
  $("error").hidden = true;
  $("error").textContent = "";
  $("result").hidden = true;
  $("result").replaceChildren();
  $("preview-figure").hidden = true;
  $("preview").removeAttribute("src");
  $("progress").value = 0;
  $("progress").max = 1;
  $("progress-text").textContent = "";
}

function showError(text, status) {
  $("error").textContent = text;
  $("error").hidden = false;
  $("status").textContent = status;
}

function busy(on) {
  $("generate").disabled = on;
  $("cancel").disabled = !on;
}

async function generate() {
  reset();
  busy(true);
  $("status").textContent = "submitting…";
  const controller = new AbortController();
  try {
    const r = await fetch("v1/jobs", {method: "POST", headers: headers(true), body: JSON.stringify(request())});
    if (r.status !== 202) {
      showError(await failureText(r), "not accepted");
      return;
    }
    const job = await r.json();
    current = {id: job.id, controller};
    $("status").textContent = `job ${job.id}: ${job.state}`;
    await follow(job.id, controller.signal);
  } catch (e) {
    if (e.name !== "AbortError") showError(`cannot reach the service: ${e.message}`, "failed");
  } finally {
    current = null;
    busy(false);
  }
}

async function follow(id, signal) {
  const r = await fetch(`v1/jobs/${encodeURIComponent(id)}/events`, {headers: headers(false), signal});
  if (!r.ok) {
    showError(await failureText(r), "lost the job");
    return;
  }
  for await (const event of serverSentEvents(r.body)) {
    if (handle(event)) return;
  }
  showError("the event stream ended before the job finished (did the service restart?)", "lost the job");
}

// Yields {event, data} for each server-sent event of a fetch() body; keep-alive comments are skipped.
async function* serverSentEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true}).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let kind = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) kind = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (data.length) yield {event: kind, data: JSON.parse(data.join("\n"))};
    }
  }
}

// Shows one event; true when it was the job's final answer.
function handle({event, data}) {
  switch (event) {
    case "queued":
      $("status").textContent = data.position === 0 ? "queued: next to start"
        : `queued: ${data.position} request${data.position === 1 ? "" : "s"} ahead`;
      $("progress").removeAttribute("value"); // indeterminate while waiting
      return false;
    case "started":
      $("status").textContent = "denoising…";
      $("progress").max = data.total;
      $("progress").value = 0;
      $("progress-text").textContent = `0 / ${data.total}`;
      return false;
    case "step":
      $("progress").max = data.total;
      $("progress").value = data.step;
      $("progress-text").textContent = `${data.step} / ${data.total}`;
      return false;
    case "preview":
      $("preview").src = `data:image/png;base64,${data.image}`;
      $("preview-caption").textContent = `preview after step ${data.step}`;
      $("preview-figure").hidden = false;
      return false;
    case "done":
      $("status").textContent = "done";
      $("progress").value = $("progress").max;
      showResult(data);
      return true;
    case "error":
      showError(data.message, data.outcome);
      return true;
    default:
      return false;
  }
}

function showResult(done) {
  $("preview-figure").hidden = true;
  const seed = done.seeds[0];
  done.images.forEach((b64, i) => {
    const item = document.createElement("div");
    item.className = "result-item";
    const img = document.createElement("img");
    img.className = "result-image";
    img.alt = done.parameters[i].split("\n")[0];
    img.src = `data:image/png;base64,${b64}`;
    const link = document.createElement("a");
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    link.href = URL.createObjectURL(new Blob([bytes], {type: "image/png"}));
    link.download = done.images.length > 1 ? `sdrt-${seed}-${i}.png` : `sdrt-${seed}.png`;
    link.textContent = `Download ${link.download}`;
    const parameters = document.createElement("pre");
    parameters.className = "parameters";
    parameters.textContent = done.parameters[i];
    item.append(img, link, parameters);
    $("result").append(item);
  });
  const t = done.timings;
  const timings = document.createElement("p");
  timings.className = "timings";
  timings.textContent = `seed ${seed}; ${Math.round(t.total_ms)} ms in all: queue ${Math.round(t.queue_ms ?? 0)} ms, ` +
    `${t.unet_evaluations} UNet steps ${Math.round(t.unet_ms ?? 0)} ms, VAE decode ${Math.round(t.vae_decode_ms ?? 0)} ms`;
  $("result").append(timings);
  $("result").hidden = false;
}

async function cancel() {
  if (!current) return;
  $("cancel").disabled = true;
  try {
    const r = await fetch(`v1/jobs/${encodeURIComponent(current.id)}`, {method: "DELETE", headers: headers(false)});
    if (!r.ok && r.status !== 409) showError(await failureText(r), "cancel failed");
  } catch (e) {
    current?.controller.abort();
    showError(`cannot reach the service: ${e.message}`, "cancel failed");
  }
}

setup();

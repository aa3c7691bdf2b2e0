// The atomtune playground: every action is a call to the public API with the tenant's key, which
// lives in sessionStorage (gone with the tab) and is sent as a header, never in a URL.
"use strict";

const KEY_STORAGE = "atomtune.api_key";
const ATTRIBUTION_ATOMS = 4;
const TOGGLED_ATOMS = 8;
const $ = (id) => document.getElementById(id);

const state = {
  key: sessionStorage.getItem(KEY_STORAGE),
  adapters: [],
  files: [],
  trainingJob: null,
  // What the base and adapter images were rendered from, so an edit re-renders only the edited one.
  renderedFrom: null,
  editRound: 0,
  droppedAtoms: new Map(), // block -> Set of atoms switched off
  attributionJob: null,
  attribution: null,
};

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(path, { method = "GET", json, form, raw = false } = {}) {
  const headers = { Authorization: `Bearer ${state.key}` };
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form !== undefined) {
    body = form;
  }
  let response;
  try {
    response = await fetch(path, { method, headers, body });
  } catch (error) {
    throw new ApiError(0, "network", `the gateway could not be reached (${error.message})`);
  }
  if (!response.ok) {
    let code = `http_${response.status}`;
    let message = `${response.status} ${response.statusText}`;
    try {
      ({ code, message } = (await response.json()).error);
    } catch {
      // Not the API's JSON error (a proxy's page, say): the status line is all there is.
    }
    throw new ApiError(response.status, code, message);
  }
  if (raw) return response;
  return response.status === 204 ? null : response.json();
}

async function blobUrl(path) {
  const response = await api(path, { raw: true });
  return URL.createObjectURL(await response.blob());
}

// Shows a blob URL in an image (or link), giving back the one it showed before.
function setBlob(element, attribute, url) {
  const previous = element.getAttribute(attribute);
  if (previous && previous.startsWith("blob:") && previous !== url && !isShownElsewhere(element, previous)) {
    URL.revokeObjectURL(previous);
  }
  element.setAttribute(attribute, url);
}

function isShownElsewhere(element, url) {
  return [...document.querySelectorAll("img[src], a[href]")].some(
    (other) => other !== element && (other.getAttribute("src") === url || other.getAttribute("href") === url),
  );
}

// Runs an action whose errors are shown in the section it belongs to.
function guarded(section, action) {
  return async (event) => {
    if (event) event.preventDefault();
    const shown = $(`${section}-error`);
    shown.textContent = "";
    try {
      await action(event);
    } catch (error) {
      shown.textContent = error instanceof ApiError ? error.message : `Unexpected: ${error.message}`;
      if (error instanceof ApiError && error.status === 401 && section !== "sign-in") signOut(error.message);
      if (!(error instanceof ApiError)) console.warn(error);
    }
  };
}

// Server-sent events over fetch (EventSource cannot send the key as a header). Resolves with the job
// as it ended; calls onProgress for every step and onStatus for every status change.
async function follow(jobId, { onProgress = () => {}, onStatus = () => {} } = {}) {
  const response = await api(`/v1/jobs/${jobId}/events`, { raw: true });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let job = null;
  for (;;) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch {
      break; // the stream was cut (a proxy, the network): the job's record below says where it is
    }
    const { value, done } = chunk;
    if (done) break;
    buffer = (buffer + value).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let type = "message";
      let data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) type = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (!data) continue;
      const payload = JSON.parse(data);
      if (type === "progress") onProgress(payload);
      else if (type === "status") {
        job = payload;
        onStatus(job);
      }
    }
  }
  // The stream ends with the job; should it have been cut short, the job's record says where it is.
  if (job === null || !["succeeded", "failed", "cancelled"].includes(job.status)) {
    job = await api(`/v1/jobs/${jobId}`);
  }
  return job;
}

function jobFailure(job) {
  if (job.status === "succeeded") return null;
  if (job.status === "cancelled") return new ApiError(409, "cancelled", "the job was cancelled");
  return new ApiError(500, job.error?.code ?? "failed", job.error?.message ?? `the job ended ${job.status}`);
}

// ---- Sign in ----

async function signIn(key) {
  state.key = key;
  try {
    await loadAdapters();
  } catch (error) {
    state.key = null;
    throw error;
  }
  sessionStorage.setItem(KEY_STORAGE, key);
  $("sign-in").hidden = true;
  $("signed-in").hidden = false;
  $("app").hidden = false;
  $("who").textContent = `Signed in (key ${key.slice(0, 10)}…)`;
}

function signOut(reason = "") {
  sessionStorage.removeItem(KEY_STORAGE);
  state.key = null;
  $("app").hidden = true;
  $("signed-in").hidden = true;
  $("sign-in").hidden = false;
  $("api-key").value = "";
  $("sign-in-error").textContent = reason;
}

// ---- Fine-tune ----

function chooseFiles(files) {
  state.files = [...files];
  const list = $("thumbnails");
  for (const image of list.querySelectorAll("img")) URL.revokeObjectURL(image.src);
  list.replaceChildren();
  state.files.forEach((file, index) => {
    const item = document.createElement("li");
    const image = document.createElement("img");
    image.alt = file.name;
    image.src = URL.createObjectURL(file);
    const label = document.createElement("label");
    label.htmlFor = `caption-${index}`;
    label.textContent = `Caption of ${file.name}`;
    label.className = "visually-hidden";
    const caption = document.createElement("input");
    caption.type = "text";
    caption.id = `caption-${index}`;
    caption.className = "caption";
    caption.maxLength = 1000;
    caption.placeholder = "caption (the prompt if empty)";
    item.append(image, label, caption);
    list.append(item);
  });
  $("drop-zone").textContent = state.files.length
    ? `${state.files.length} image${state.files.length === 1 ? "" : "s"} chosen (drop or choose again to replace)`
    : "Drop 1-10 images of your concept here, or choose them";
}

function drawLoss(losses) {
  const line = $("loss-line");
  if (losses.length < 2) {
    line.setAttribute("points", "");
    return;
  }
  const high = Math.max(...losses);
  const low = Math.min(...losses);
  const span = high - low || 1;
  const points = losses.map((loss, i) => {
    const x = (i / (losses.length - 1)) * 300;
    const y = 95 - ((loss - low) / span) * 90;
    return `${x.toFixed(1)},${y.toFixed(1)}`;
  });
  line.setAttribute("points", points.join(" "));
  line.dataset.count = String(losses.length);
}

async function startFinetune() {
  const form = new FormData();
  for (const file of state.files) form.append("images", file, file.name);
  // Captions name each image's context (its colour, its background) so the adapter learns the
  // concept apart from them; an image left uncaptioned is trained on the prompt.
  const captions = [...$("thumbnails").querySelectorAll("input.caption")].map((c) => c.value.trim());
  if (captions.some((caption) => caption !== "")) {
    for (const caption of captions) form.append("captions", caption || $("ft-prompt").value);
  }
  for (const field of $("finetune-form").querySelectorAll("[name]:not([type=file])")) {
    if (field.value !== "") form.append(field.name, field.value);
  }
  $("ft-start").disabled = true;
  try {
    const created = await api("/v1/adapters", { method: "POST", form });
    state.trainingJob = created.job_id;
    const losses = [];
    drawLoss(losses);
    $("ft-progress").hidden = false;
    $("ft-bar").value = 0;
    $("ft-status").textContent = "Queued…";
    delete $("ft-status").dataset.status;
    $("ft-cancel").disabled = false;
    await loadAdapters();
    const job = await follow(created.job_id, {
      onProgress: ({ step, total, loss }) => {
        $("ft-bar").max = total;
        $("ft-bar").value = step;
        if (loss !== null && loss !== undefined) losses.push(loss);
        drawLoss(losses);
        const shown = loss === null || loss === undefined ? "" : `, loss ${loss.toFixed(4)}`;
        $("ft-status").textContent = `Training: step ${step} / ${total}${shown}`;
      },
      onStatus: (job) => {
        if (job.status === "running" && !losses.length) $("ft-status").textContent = "Training: starting…";
      },
    });
    $("ft-status").textContent = `Fine-tune ${job.status}${job.status === "succeeded" ? `: adapter ${job.result.adapter_id}` : ""}`;
    $("ft-status").dataset.status = job.status;
    await loadAdapters();
    if (job.status === "succeeded") await selectAdapter(job.result.adapter_id);
    const failure = jobFailure(job);
    if (failure && job.status !== "cancelled") throw failure;
  } finally {
    state.trainingJob = null;
    $("ft-start").disabled = false;
    $("ft-cancel").disabled = true;
  }
}

async function cancelFinetune() {
  if (state.trainingJob) await api(`/v1/jobs/${state.trainingJob}`, { method: "DELETE" });
}

// ---- Adapters ----

async function loadAdapters() {
  const adapters = [];
  let cursor = null;
  do {
    const page = await api(`/v1/adapters?limit=100${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`);
    adapters.push(...page.items);
    cursor = page.next_cursor;
  } while (cursor && adapters.length < 500);
  state.adapters = adapters;
  renderAdapters();
}

function button(text, onClick, className = "") {
  const element = document.createElement("button");
  element.type = "button";
  element.textContent = text;
  if (className) element.className = className;
  element.addEventListener("click", onClick);
  return element;
}

function renderAdapters() {
  const rows = $("adapter-rows");
  rows.replaceChildren();
  for (const adapter of state.adapters) {
    const row = document.createElement("tr");
    row.dataset.adapter = adapter.id;
    const loss = adapter.metrics?.final_loss;
    const cells = [
      adapter.prompt || adapter.id,
      adapter.status,
      typeof loss === "number" ? loss.toFixed(4) : "—",
      new Date(adapter.created_at).toLocaleString(undefined, { dateStyle: "short", timeStyle: "short" }),
    ];
    for (const text of cells) {
      const cell = document.createElement("td");
      cell.textContent = text;
      row.append(cell);
    }
    row.children[1].className = `status-${adapter.status}`;
    const actions = document.createElement("td");
    actions.className = "actions";
    const label = adapter.prompt || adapter.id;
    if (adapter.status === "ready") {
      const use = button("Use", guarded("adapters", () => selectAdapter(adapter.id)));
      use.setAttribute("aria-label", `Use ${label}`);
      const download = button("Download", guarded("adapters", () => downloadAdapter(adapter.id)));
      download.setAttribute("aria-label", `Download ${label}`);
      actions.append(use, download);
    }
    const remove = button("Delete", null, "danger");
    remove.setAttribute("aria-label", `Delete ${label}`);
    remove.addEventListener(
      "click",
      guarded("adapters", async () => {
        // A second press within a few seconds confirms, so one stray click deletes nothing.
        if (remove.dataset.armed !== "1") {
          remove.dataset.armed = "1";
          remove.textContent = "Confirm delete";
          setTimeout(() => {
            remove.dataset.armed = "";
            remove.textContent = "Delete";
          }, 4000);
          return;
        }
        await api(`/v1/adapters/${adapter.id}`, { method: "DELETE" });
        await loadAdapters();
      }),
    );
    actions.append(remove);
    row.append(actions);
    rows.append(row);
  }
  $("no-adapters").hidden = state.adapters.length > 0;
  const select = $("gen-adapter");
  const chosen = select.value;
  select.replaceChildren(new Option("none (the base model)", ""));
  for (const adapter of state.adapters.filter((a) => a.status === "ready")) {
    select.append(new Option(adapter.prompt || adapter.id, adapter.id));
  }
  select.value = state.adapters.some((a) => a.id === chosen && a.status === "ready") ? chosen : "";
  if (select.value !== chosen) guarded("generate", adapterChanged)();
}

async function downloadAdapter(adapterId) {
  const link = document.createElement("a");
  link.href = await blobUrl(`/v1/adapters/${adapterId}/download`);
  link.download = `adapter-${adapterId}.zip`;
  document.body.append(link);
  link.click();
  link.remove();
  // The download has its own copy once it started.
  setTimeout(() => URL.revokeObjectURL(link.href), 60000);
}

async function importAdapter() {
  const file = $("import-file").files[0];
  const form = new FormData();
  if (file) form.append("file", file, file.name);
  form.append("prompt", $("import-prompt").value);
  await api("/v1/adapters/import", { method: "POST", form });
  $("import-file").value = "";
  await loadAdapters();
}

// ---- Generate and edit ----

function chosenAdapter() {
  return state.adapters.find((a) => a.id === $("gen-adapter").value) ?? null;
}

async function selectAdapter(adapterId) {
  $("gen-adapter").value = adapterId;
  if (!$("gen-prompt").value) $("gen-prompt").value = chosenAdapter()?.prompt ?? "";
  await adapterChanged();
}

async function adapterChanged() {
  const adapter = chosenAdapter();
  state.droppedAtoms = new Map();
  state.renderedFrom = null;
  $("atom-toggles").replaceChildren();
  $("edit-controls").disabled = adapter === null;
  if (adapter === null) return;
  const atoms = adapter.config.num_atoms;
  $("density").value = adapter.config.density;
  $("top-atoms").max = atoms;
  $("top-atoms").value = atoms;
  showEditValues();
  const importance = await api(`/v1/adapters/${adapter.id}/atoms?limit=${TOGGLED_ATOMS}`);
  // Another adapter may have been chosen while this one's atoms were on their way.
  if (chosenAdapter()?.id === adapter.id) renderToggles(importance.blocks);
}

function renderToggles(blocks) {
  const container = $("atom-toggles");
  container.replaceChildren();
  for (const { block, atoms } of blocks) {
    const group = document.createElement("fieldset");
    const legend = document.createElement("legend");
    legend.textContent = `Block ${block}`;
    group.append(legend);
    const top = atoms.length ? atoms[0].importance || 1 : 1;
    for (const { atom, importance } of atoms) {
      const id = `atom-${block}-${atom}`;
      const row = document.createElement("div");
      row.className = "atom";
      const toggle = document.createElement("input");
      toggle.type = "checkbox";
      toggle.id = id;
      toggle.checked = true;
      toggle.dataset.block = String(block);
      toggle.dataset.atom = String(atom);
      const label = document.createElement("label");
      label.htmlFor = id;
      label.textContent = `atom ${atom}`;
      label.title = `importance ${importance.toPrecision(3)}`;
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.style.width = `${Math.max(2, (100 * importance) / top)}%`;
      bar.setAttribute("aria-hidden", "true");
      toggle.addEventListener("change", () => {
        const dropped = state.droppedAtoms.get(block) ?? new Set();
        if (toggle.checked) dropped.delete(atom);
        else dropped.add(atom);
        state.droppedAtoms.set(block, dropped);
        row.classList.toggle("off", !toggle.checked);
        scheduleEdit();
      });
      row.append(toggle, label, bar);
      group.append(row);
    }
    container.append(group);
  }
}

function showEditValues() {
  const adapter = chosenAdapter();
  const density = Number($("density").value);
  const atoms = adapter?.config.num_atoms ?? 0;
  const k = Math.max(1, Math.round(density * atoms));
  $("density-value").textContent = `${density.toFixed(2)} (k = ${k} of ${atoms} atoms)`;
  const top = Number($("top-atoms").value);
  $("top-atoms-value").textContent = top >= atoms ? "all" : String(top);
}

function commonRequest() {
  return {
    prompt: $("gen-prompt").value,
    negative_prompt: $("gen-negative").value,
    seed: Number($("gen-seed").value),
    steps: Number($("gen-steps").value),
    guidance_scale: Number($("gen-guidance").value),
  };
}

function editedRequest(adapter) {
  const request = { ...commonRequest(), adapter_id: adapter.id, density: Number($("density").value) };
  const top = Number($("top-atoms").value);
  if (top < adapter.config.num_atoms) request.top_atoms = top;
  const blocks = {};
  for (const [block, atoms] of state.droppedAtoms) if (atoms.size) blocks[block] = [...atoms].sort((a, b) => a - b);
  if (Object.keys(blocks).length) request.atom_mask = { mode: "drop", blocks };
  return request;
}

function describeEdit(request) {
  const dropped = Object.values(request.atom_mask?.blocks ?? {}).reduce((n, atoms) => n + atoms.length, 0);
  const top = request.top_atoms === undefined ? "all" : request.top_atoms;
  return `Edited: density ${request.density.toFixed(2)}, top ${top}, ${dropped} atom${dropped === 1 ? "" : "s"} off`;
}

// Renders one image into its figure; resolves with the finished job.
async function render(slot, request, caption) {
  const figure = $(`render-${slot}`);
  const bar = figure.querySelector("progress");
  figure.querySelector("figcaption").textContent = `${caption}: queued…`;
  figure.setAttribute("aria-busy", "true");
  bar.hidden = false;
  bar.value = 0;
  try {
    const { job_id: jobId } = await api("/v1/generations", { method: "POST", json: request });
    const job = await follow(jobId, {
      onProgress: ({ step, total }) => {
        bar.max = total;
        bar.value = step;
        figure.querySelector("figcaption").textContent = `${caption}: step ${step} / ${total}`;
      },
    });
    const failure = jobFailure(job);
    if (failure) throw failure;
    return { job, url: await blobUrl(job.result.images[0]) };
  } finally {
    bar.hidden = true;
    figure.removeAttribute("aria-busy");
  }
}

function show(slot, { job, url }, caption) {
  const figure = $(`render-${slot}`);
  const image = figure.querySelector("img");
  const link = figure.querySelector("a.download");
  setBlob(image, "src", url);
  setBlob(link, "href", url);
  figure.dataset.job = job.id;
  figure.querySelector("figcaption").textContent = `${caption} (seed ${job.result.seed})`;
  link.download = `${slot}-${job.id}.png`;
  link.hidden = false;
}

async function generate() {
  $("gen-start").disabled = true;
  try {
    await generateAll();
  } finally {
    $("gen-start").disabled = false;
  }
}

async function generateAll() {
  const adapter = chosenAdapter();
  const common = commonRequest();
  const edited = adapter === null ? null : editedRequest(adapter);
  const renders = [render("base", common, "Base")];
  for (const slot of ["adapter", "edited"]) {
    $(`render-${slot}`).querySelector("img").removeAttribute("src");
    $(`render-${slot}`).querySelector("a.download").hidden = true;
    $(`render-${slot}`).querySelector("figcaption").textContent = slot === "adapter" ? "Adapter" : "Edited";
  }
  if (adapter !== null) {
    const withAdapter = { ...common, adapter_id: adapter.id, attribution: ATTRIBUTION_ATOMS };
    renders.push(render("adapter", withAdapter, "Adapter"), render("edited", edited, describeEdit(edited)));
  }
  state.editRound += 1;
  const settled = await Promise.allSettled(renders);
  const captions = ["Base", "Adapter", edited === null ? "" : describeEdit(edited)];
  settled.forEach((outcome, i) => {
    if (outcome.status === "fulfilled") show(["base", "adapter", "edited"][i], outcome.value, captions[i]);
  });
  const failed = settled.find((outcome) => outcome.status === "rejected");
  if (failed) throw failed.reason;
  state.renderedFrom = adapter === null ? null : JSON.stringify({ ...common, adapter: adapter.id });
  if (adapter !== null) await loadAttribution(settled[1].value);
}

// An edit (density, top atoms, an atom toggle) re-renders only the edited image, with the same seed,
// once the controls have been still for a moment (a held arrow key would otherwise queue a job a press).
const EDIT_SETTLE_MS = 300;
let editTimer = null;

function scheduleEdit() {
  showEditValues();
  clearTimeout(editTimer);
  editTimer = setTimeout(edit, EDIT_SETTLE_MS);
}

const edit = guarded("generate", async () => {
  const adapter = chosenAdapter();
  if (adapter === null) return;
  const from = JSON.stringify({ ...commonRequest(), adapter: adapter.id });
  if (state.renderedFrom !== from) return; // nothing rendered for these settings yet: Generate does it
  const round = ++state.editRound;
  const request = editedRequest(adapter);
  const rendered = await render("edited", request, describeEdit(request));
  if (round === state.editRound) show("edited", rendered, describeEdit(request));
});

// ---- Attribution ----

async function loadAttribution({ job, url }) {
  state.attributionJob = job.id;
  setBlob($("attr-source"), "src", url);
  state.attribution = await api(job.result.attribution);
  const select = $("attr-block");
  select.replaceChildren();
  for (const entry of state.attribution.blocks) select.append(new Option(`Block ${entry.block}`, String(entry.block)));
  $("attribution-hint").hidden = true;
  $("attribution-view").hidden = false;
  await showBlock();
}

function mass(grids) {
  return grids[0].flat().reduce((sum, value) => sum + value, 0);
}

async function showBlock() {
  const entry = state.attribution.blocks.find((b) => String(b.block) === $("attr-block").value);
  const chips = $("attr-atoms");
  chips.replaceChildren();
  const choices = [["total", "All atoms", entry.total], ...entry.atoms.map((a) => [String(a.atom), `Atom ${a.atom}`, a.maps])];
  for (const [atom, text, grids] of choices) {
    const chip = button(text, guarded("attribution", () => showMap(entry, atom, grids, chip)));
    chip.setAttribute("aria-pressed", "false");
    chip.dataset.atom = atom;
    chips.append(chip);
  }
  await showMap(entry, "total", entry.total, chips.firstChild);
}

async function showMap(entry, atom, grids, chip) {
  for (const other of $("attr-atoms").children) other.setAttribute("aria-pressed", String(other === chip));
  const url = await blobUrl(`/v1/jobs/${state.attributionJob}/attribution/0/${entry.block}/${atom}.png`);
  const image = $("attr-image");
  setBlob(image, "src", url);
  image.dataset.atom = atom;
  const share = (100 * mass(grids)) / (mass(entry.total) || 1);
  $("attr-caption").textContent =
    atom === "total"
      ? `Block ${entry.block}: the adapter's whole effect, per image patch`
      : `Block ${entry.block}, atom ${atom}: ${share.toFixed(1)} % of the block's effect`;
}

// ---- Wiring ----

function wire() {
  $("sign-in").addEventListener(
    "submit",
    guarded("sign-in", () => signIn($("api-key").value.trim())),
  );
  $("sign-out").addEventListener("click", () => signOut());
  $("images").addEventListener("change", (event) => chooseFiles(event.target.files));
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    chooseFiles(event.dataTransfer.files);
  });
  $("finetune-form").addEventListener("submit", guarded("finetune", startFinetune));
  $("ft-cancel").addEventListener("click", guarded("finetune", cancelFinetune));
  $("import-form").addEventListener("submit", guarded("adapters", importAdapter));
  $("generate-form").addEventListener("submit", guarded("generate", generate));
  $("gen-adapter").addEventListener("change", guarded("generate", adapterChanged));
  $("gen-reseed").addEventListener("click", () => {
    $("gen-seed").value = String(Math.floor(Math.random() * 2 ** 31));
  });
  for (const slider of [$("density"), $("top-atoms")]) {
    slider.addEventListener("input", showEditValues);
    slider.addEventListener("change", scheduleEdit);
  }
  $("attr-block").addEventListener("change", guarded("attribution", showBlock));
  if (state.key) guarded("sign-in", () => signIn(state.key))();
}

wire();

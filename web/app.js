// tailor's playground: compare model ids (base, adapters, presets) and
// templates side by side, see the exact prompt, chat, manage adapters, and
// watch the server. Plain browser JavaScript, served by tailor itself; it
// talks to the same API any client uses.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "tailor-api-key";

const state = {
  // Kept in sessionStorage: gone when the tab closes.
  key: sessionStorage.getItem(KEY_STORAGE) || "",
  models: [],
  templates: [],
  columns: [],
  chat: [],
};

// ---------------------------------------------------------------- the API

let keyPrompt = null;

/** Asks for the key (once, however many requests are waiting for it). */
function askKey(message) {
  if (!keyPrompt) {
    keyPrompt = new Promise((resolve) => {
      const dialog = $("key-dialog");
      $("key-error").textContent = message || "";
      $("key-input").value = "";
      dialog.addEventListener(
        "close",
        () => {
          state.key = $("key-input").value.trim();
          sessionStorage.setItem(KEY_STORAGE, state.key);
          keyPrompt = null;
          resolve();
        },
        { once: true }
      );
      dialog.showModal();
      $("key-input").focus();
    });
  }
  return keyPrompt;
}

/** fetch with the key; a 401 asks for the key and tries again. */
async function api(path, { method = "GET", body, signal } = {}) {
  for (;;) {
    const headers = {};
    if (body !== undefined) headers["content-type"] = "application/json";
    if (state.key) headers.authorization = `Bearer ${state.key}`;
    const response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
    });
    if (response.status !== 401) return response;
    await askKey(state.key ? "That key was refused." : "");
  }
}

async function getJson(path, options) {
  const response = await api(path, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error?.message || `${response.status} ${response.statusText}`);
  return body;
}

/**
 * Streams a chat completion: calls onText with each piece of text, returns
 * the whole reply with its time to first token and generation speed.
 */
async function streamChat(body, onText) {
  const started = performance.now();
  const response = await api("/v1/chat/completions", {
    method: "POST",
    body: { ...body, stream: true, stream_options: { include_usage: true } },
  });
  if (!response.ok) {
    const error = await response.json().catch(() => ({}));
    throw new Error(error.error?.message || `${response.status} ${response.statusText}`);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let text = "";
  let first = null;
  let usage = null;
  let finish = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, end).trim();
      buffer = buffer.slice(end + 1);
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const piece = choice.delta?.content;
        if (piece) {
          if (first === null) first = performance.now();
          text += piece;
          onText(text);
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
  }
  const ended = performance.now();
  const tokens = usage?.completion_tokens ?? 0;
  const generating = first === null ? 0 : (ended - first) / 1000;
  return {
    text,
    finish,
    usage,
    ttftMs: first === null ? null : first - started,
    tokensPerSecond: tokens > 1 && generating > 0 ? (tokens - 1) / generating : null,
  };
}

// ------------------------------------------------------------- utilities

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "text") node.textContent = v;
    else if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const child of [].concat(children)) if (child) node.append(child);
  return node;
}

function status(message, isError = false) {
  const node = $("status");
  node.textContent = message;
  node.className = isError ? "error" : "";
}

function fillSelect(select, options, { empty } = {}) {
  const previous = select.value;
  select.replaceChildren();
  if (empty) select.append(el("option", { value: "", text: empty }));
  for (const { value, label } of options) select.append(el("option", { value, text: label }));
  if ([...select.options].some((o) => o.value === previous)) select.value = previous;
}

function modelOptions() {
  return state.models.map((m) => ({ value: m.id, label: m.kind ? `${m.id} (${m.kind})` : m.id }));
}

function templateOptions() {
  return state.templates.map((t) => ({ value: t.name, label: t.name }));
}

async function copy(text, what) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // Not a secure context: the old way.
    const area = el("textarea", { class: "offscreen" });
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  status(`${what} copied to the clipboard`);
}

function shellQuote(text) {
  return `'${text.replaceAll("'", `'\\''`)}'`;
}

function asCurl(body) {
  const auth = state.key ? ` \\\n  -H "Authorization: Bearer $TAILOR_API_KEY"` : "";
  return `curl ${location.origin}/v1/chat/completions \\\n  -H 'content-type: application/json'${auth} \\\n  -d ${shellQuote(JSON.stringify(body, null, 2))}`;
}

function pythonValue(value) {
  return JSON.stringify(value, null, 4)
    .replace(/\btrue\b/g, "True")
    .replace(/\bfalse\b/g, "False")
    .replace(/\bnull\b/g, "None");
}

function asPython(bodies) {
  const lines = [
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url="${location.origin}/v1", api_key=${state.key ? 'os.environ["TAILOR_API_KEY"]' : '"unused"'})`,
  ];
  if (state.key) lines.unshift("import os");
  for (const body of bodies) {
    const { model, messages, ...rest } = body;
    const standard = ["temperature", "max_tokens", "seed", "stop"];
    const args = [`    model=${JSON.stringify(model)},`, `    messages=${pythonValue(messages).replaceAll("\n", "\n    ")},`];
    for (const k of standard) if (k in rest) args.push(`    ${k}=${pythonValue(rest[k])},`);
    const extra = Object.fromEntries(Object.entries(rest).filter(([k]) => !standard.includes(k)));
    if (Object.keys(extra).length) args.push(`    extra_body=${pythonValue(extra).replaceAll("\n", "\n    ")},`);
    lines.push("", "reply = client.chat.completions.create(", ...args, ")", "print(reply.choices[0].message.content)");
  }
  return lines.join("\n");
}

/** A variable's value from its input: JSON when it parses as a list, object or number. */
function readVariable(input) {
  const raw = input.value;
  if (raw === "") return undefined;
  if (input.dataset.json === "true" || /^\s*[[{]/.test(raw)) {
    try {
      return JSON.parse(raw);
    } catch {
      return raw;
    }
  }
  if (/^-?\d+(\.\d+)?$/.test(raw.trim())) return Number(raw);
  return raw;
}

/** A form of a template's variables: required ones marked, defaults shown. */
function variablesForm(container, template, idPrefix) {
  container.replaceChildren();
  if (!template) return;
  for (const [name, spec] of Object.entries(template.variables || {})) {
    const id = `${idPrefix}-${name}`;
    const structured = spec.default !== undefined && typeof spec.default !== "string";
    const input = el("textarea", {
      id,
      rows: structured ? 4 : 2,
      "data-name": name,
      "data-json": structured ? "true" : "false",
      "aria-required": spec.required ? "true" : "false",
      placeholder: spec.required ? "required" : "",
    });
    if (spec.default !== undefined) input.value = structured ? JSON.stringify(spec.default, null, 2) : spec.default;
    const label = el("label", { for: id }, [
      el("span", { text: name + (spec.required ? " *" : "") }),
      spec.description ? el("small", { text: ` ${spec.description}` }) : null,
    ]);
    container.append(el("div", { class: "var" }, [label, input]));
  }
}

function readVariables(container) {
  const vars = {};
  for (const input of container.querySelectorAll("[data-name]")) {
    const value = readVariable(input);
    if (value !== undefined) vars[input.dataset.name] = value;
  }
  return vars;
}

// ------------------------------------------------------------------ tabs

function selectTab(tab) {
  for (const t of document.querySelectorAll('[role="tab"]')) {
    const selected = t === tab;
    t.setAttribute("aria-selected", selected);
    t.tabIndex = selected ? 0 : -1;
    $(t.getAttribute("aria-controls")).hidden = !selected;
  }
  tab.focus();
  if (tab.id === "tab-models") refreshModels();
}

function setUpTabs() {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  tabs.forEach((tab, i) => {
    tab.addEventListener("click", () => selectTab(tab));
    tab.addEventListener("keydown", (e) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[e.key];
      if (step) selectTab(tabs[(i + step + tabs.length) % tabs.length]);
    });
  });
}

// --------------------------------------------------------------- compare

function addColumn(model = "", template = "") {
  if (state.columns.length >= 4) return;
  const index = state.columns.length;
  const n = index + 1;
  const column = { model, template };
  const modelSelect = el("select", { id: `col-${n}-model`, "aria-label": `Column ${n} model` });
  fillSelect(modelSelect, modelOptions());
  if (model) modelSelect.value = model;
  const templateSelect = el("select", { id: `col-${n}-template`, "aria-label": `Column ${n} template` });
  fillSelect(templateSelect, templateOptions(), { empty: "(no template)" });
  templateSelect.value = template;
  const adapters = el("input", { id: `col-${n}-adapters`, type: "text", placeholder: "pirate:0.7, shout:0.5", "aria-label": `Column ${n} adapters with weights` });
  const temperature = el("input", { id: `col-${n}-temperature`, type: "number", min: 0, max: 2, step: 0.1, placeholder: "shared", "aria-label": `Column ${n} temperature` });
  const maxTokens = el("input", { id: `col-${n}-max-tokens`, type: "number", min: 1, placeholder: "shared", "aria-label": `Column ${n} max tokens` });
  const reply = el("pre", { id: `col-${n}-reply`, class: "reply", "aria-live": "polite", tabindex: 0, "aria-label": `Column ${n} reply` });
  const stats = el("p", { id: `col-${n}-stats`, class: "stats muted" });
  Object.assign(column, { modelSelect, templateSelect, adapters, temperature, maxTokens, reply, stats });
  const node = el("article", { class: "column", id: `col-${n}` }, [
    el("h3", { text: `Column ${n}` }),
    el("label", {}, ["Model ", modelSelect]),
    el("label", { class: "column-template" }, ["Template ", templateSelect]),
    el("label", { title: "Adapters applied together on the base or a preset, each name:weight (weight 1 when left out)" }, ["Adapters ", adapters]),
    el("div", { class: "row small" }, [el("label", {}, ["Temp. ", temperature]), el("label", {}, ["Max tokens ", maxTokens])]),
    reply,
    stats,
  ]);
  column.node = node;
  state.columns.push(column);
  $("columns").append(node);
  syncSource();
}

function removeColumn() {
  if (state.columns.length <= 2) return;
  state.columns.pop().node.remove();
}

function compareSource() {
  return document.querySelector('input[name="compare-source"]:checked').value;
}

function syncSource() {
  const byTemplate = compareSource() === "template";
  $("compare-message-box").hidden = byTemplate;
  $("compare-template-box").hidden = !byTemplate;
  for (const c of state.columns) c.node.querySelector(".column-template").hidden = byTemplate;
}

function sharedParams() {
  const number = (id) => ($(id).value === "" ? undefined : Number($(id).value));
  const stop = $("p-stop").value.split(",").map((s) => s.trim()).filter(Boolean);
  return {
    temperature: number("p-temperature"),
    max_tokens: number("p-max-tokens"),
    seed: number("p-seed"),
    stop: stop.length ? stop : undefined,
  };
}

/** `pirate:0.7, shout` → the request's `adapters` list (undefined when empty). */
function readAdapters(text) {
  const list = text.split(",").map((s) => s.trim()).filter(Boolean).map((entry) => {
    const at = entry.lastIndexOf(":");
    const raw = at < 0 ? "" : entry.slice(at + 1).trim();
    const name = at < 0 ? entry : entry.slice(0, at).trim();
    if (raw === "") return { name };
    // Anything but a finite number goes as typed, for the server to refuse.
    const weight = Number(raw);
    return { name, weight: Number.isFinite(weight) ? weight : raw };
  });
  return list.length ? list : undefined;
}

/** The request body of each column, as it will be sent. */
function compareBodies() {
  const shared = sharedParams();
  const sameSeed = $("p-same-seed").checked;
  return state.columns.map((c, i) => {
    const body = { model: c.modelSelect.value };
    if (compareSource() === "template") {
      body.template = $("compare-template").value;
      body.template_vars = readVariables($("compare-vars"));
      body.messages = [];
    } else {
      body.messages = [{ role: "user", content: $("compare-message").value }];
      if (c.templateSelect.value) body.template = c.templateSelect.value;
    }
    const adapters = readAdapters(c.adapters.value);
    if (adapters) body.adapters = adapters;
    const temperature = c.temperature.value === "" ? shared.temperature : Number(c.temperature.value);
    const maxTokens = c.maxTokens.value === "" ? shared.max_tokens : Number(c.maxTokens.value);
    if (temperature !== undefined) body.temperature = temperature;
    if (maxTokens !== undefined) body.max_tokens = maxTokens;
    if (shared.seed !== undefined) body.seed = sameSeed ? shared.seed : shared.seed + i;
    if (shared.stop) body.stop = shared.stop;
    return body;
  });
}

async function runCompare() {
  const bodies = compareBodies();
  $("compare-run").disabled = true;
  status("Running…");
  const runs = state.columns.map(async (c, i) => {
    c.reply.textContent = "";
    c.reply.classList.remove("error");
    c.stats.textContent = "…";
    c.node.dataset.state = "running";
    try {
      const result = await streamChat(bodies[i], (text) => (c.reply.textContent = text));
      const speed = result.tokensPerSecond === null ? "–" : result.tokensPerSecond.toFixed(1);
      const ttft = result.ttftMs === null ? "–" : Math.round(result.ttftMs);
      c.stats.textContent = `${result.usage?.completion_tokens ?? "?"} tokens · first token ${ttft} ms · ${speed} tok/s · ${result.finish}`;
      c.node.dataset.state = "done";
    } catch (e) {
      c.reply.textContent = e.message;
      c.reply.classList.add("error");
      c.stats.textContent = "";
      c.node.dataset.state = "failed";
    }
  });
  await Promise.all(runs);
  $("compare-run").disabled = false;
  status("Done");
}

function setUpCompare() {
  for (const radio of document.querySelectorAll('input[name="compare-source"]')) radio.addEventListener("change", syncSource);
  $("compare-template").addEventListener("change", () =>
    variablesForm($("compare-vars"), state.templates.find((t) => t.name === $("compare-template").value), "compare-var")
  );
  $("compare-add").addEventListener("click", () => addColumn());
  $("compare-remove").addEventListener("click", removeColumn);
  $("compare-run").addEventListener("click", runCompare);
  $("compare-curl").addEventListener("click", () => copy(compareBodies().map(asCurl).join("\n\n"), "curl"));
  $("compare-python").addEventListener("click", () => copy(asPython(compareBodies()), "Python"));
}

// ---------------------------------------------------------------- prompt

function showTemplate() {
  const template = state.templates.find((t) => t.name === $("prompt-template").value);
  $("prompt-description").textContent = template?.description || "";
  const defaults = { ...(template?.parameters || {}) };
  if (template?.system) defaults.system = template.system;
  $("prompt-defaults").textContent = Object.keys(defaults).length ? `Defaults: ${JSON.stringify(defaults)}` : "";
  variablesForm($("prompt-vars"), template, "prompt-var");
  $("prompt-text").textContent = "";
  $("prompt-count").textContent = "–";
}

async function renderPrompt(event) {
  event.preventDefault();
  const name = $("prompt-template").value;
  try {
    const rendered = await getJson(`/v1/templates/${encodeURIComponent(name)}/render`, {
      method: "POST",
      body: { model: $("prompt-model").value, mode: $("prompt-mode").value, template_vars: readVariables($("prompt-vars")) },
    });
    $("prompt-text").textContent = rendered.prompt;
    $("prompt-count").textContent = String(rendered.count);
    status(`Rendered ${name}: ${rendered.count} tokens`);
  } catch (e) {
    $("prompt-text").textContent = "";
    $("prompt-count").textContent = "–";
    status(e.message, true);
  }
}

function setUpPrompt() {
  $("prompt-template").addEventListener("change", showTemplate);
  $("prompt-form").addEventListener("submit", renderPrompt);
}

// ------------------------------------------------------------------ chat

function chatBody() {
  const messages = [];
  if ($("chat-system").value.trim()) messages.push({ role: "system", content: $("chat-system").value });
  messages.push(...state.chat);
  return {
    model: $("chat-model").value,
    messages,
    temperature: Number($("chat-temperature").value),
    max_tokens: Number($("chat-max-tokens").value),
  };
}

function chatEntry(role, text) {
  const body = el("div", { class: "text", text });
  const item = el("li", { class: `message ${role}` }, [el("strong", { text: role === "user" ? "You" : "Assistant" }), body]);
  $("chat-log").append(item);
  return { item, body };
}

async function sendChat(event) {
  event.preventDefault();
  const content = $("chat-input").value.trim();
  if (!content) return;
  $("chat-input").value = "";
  state.chat.push({ role: "user", content });
  chatEntry("user", content);
  const reply = chatEntry("assistant", "");
  reply.item.dataset.state = "running";
  $("chat-send").disabled = true;
  try {
    const result = await streamChat(chatBody(), (text) => (reply.body.textContent = text));
    state.chat.push({ role: "assistant", content: result.text });
    reply.item.dataset.state = "done";
  } catch (e) {
    reply.body.textContent = e.message;
    reply.item.classList.add("error");
    reply.item.dataset.state = "failed";
    state.chat.pop();
  }
  $("chat-send").disabled = false;
  $("chat-input").focus();
}

function setUpChat() {
  $("chat-form").addEventListener("submit", sendChat);
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) sendChat(e);
  });
  $("chat-clear").addEventListener("click", () => {
    state.chat = [];
    $("chat-log").replaceChildren();
  });
  $("chat-curl").addEventListener("click", () => copy(asCurl(chatBody()), "curl"));
  $("chat-python").addEventListener("click", () => copy(asPython([chatBody()]), "Python"));
}

// ---------------------------------------------------------------- models

async function refreshModels() {
  try {
    state.models = (await getJson("/v1/models")).data;
  } catch (e) {
    status(e.message, true);
    return;
  }
  const body = $("models-body");
  body.replaceChildren();
  for (const m of state.models) {
    const unload =
      m.kind === "adapter"
        ? el("button", { text: "Unload", "aria-label": `Unload ${m.id}`, onclick: () => unloadAdapter(m.id) })
        : null;
    body.append(
      el("tr", {}, [
        el("th", { scope: "row", text: m.id }),
        el("td", { text: m.kind || "" }),
        el("td", { text: m.parent || "–" }),
        el("td", { text: m.root }),
        el("td", {}, unload),
      ])
    );
  }
  for (const select of [$("chat-model"), $("prompt-model"), ...state.columns.map((c) => c.modelSelect)]) fillSelect(select, modelOptions());
}

async function changeAdapter(path, body, done) {
  try {
    const response = await api(path, { method: "POST", body });
    const text = await response.text();
    if (!response.ok) {
      let message = text;
      try {
        message = JSON.parse(text).error?.message || text;
      } catch {}
      throw new Error(message);
    }
    status(done);
    await refreshModels();
  } catch (e) {
    status(e.message, true);
  }
}

function unloadAdapter(name) {
  return changeAdapter("/v1/unload_lora_adapter", { lora_name: name }, `Unloaded ${name}`);
}

function setUpModels() {
  $("load-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const name = $("load-name").value.trim();
    changeAdapter("/v1/load_lora_adapter", { lora_name: name, lora_path: $("load-path").value.trim() }, `Loaded ${name}`);
  });
}

// ------------------------------------------------------------------ live

const live = { samples: [], previous: null };
const WINDOW_SECONDS = 300;

/** Prometheus text → [{name, labels, value}]. */
function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = line.match(/^([^\s{]+)(?:\{(.*)\})?\s+(\S+)/);
    if (!match) continue;
    const labels = {};
    for (const [, k, v] of (match[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[k] = v.replace(/\\(.)/g, "$1");
    samples.push({ name: match[1], labels, value: Number(match[3]) });
  }
  return samples;
}

async function pollMetrics() {
  let samples;
  try {
    const response = await api("/metrics");
    if (!response.ok) return;
    samples = parseMetrics(await response.text());
  } catch {
    return;
  }
  const now = Date.now() / 1000;
  const generated = {};
  for (const s of samples.filter((s) => s.name === "tailor_generation_tokens_total")) {
    generated[s.labels.model] = (generated[s.labels.model] || 0) + s.value;
  }
  const running = samples.find((s) => s.name === "vllm:num_requests_running")?.value ?? 0;
  const info = samples.find((s) => s.name === "vllm:lora_requests_info");
  $("live-adapters").textContent = info?.labels.running_lora_adapters || "none";
  if (live.previous) {
    const seconds = now - live.previous.time;
    const rates = {};
    for (const [model, total] of Object.entries(generated)) {
      rates[model] = Math.max(0, (total - (live.previous.generated[model] || 0)) / seconds);
    }
    live.samples.push({ time: now, rates, running });
  }
  live.previous = { time: now, generated };
  live.samples = live.samples.filter((s) => now - s.time <= WINDOW_SECONDS);
  if (!$("view-live").hidden) drawLive(now);
}

const COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#db2777", "#0891b2", "#4b5563"];

function drawChart(canvas, now, series, unit) {
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  ctx.clearRect(0, 0, width, height);
  const pad = 36;
  const max = Math.max(1, ...series.flatMap((s) => s.points.map((p) => p[1])));
  ctx.strokeStyle = "#9ca3af";
  ctx.fillStyle = "#374151";
  ctx.font = "12px sans-serif";
  ctx.strokeRect(pad, 8, width - pad - 8, height - pad);
  ctx.fillText(`${max.toFixed(max < 10 ? 1 : 0)} ${unit}`, 2, 18);
  ctx.fillText("0", 2, height - pad + 8);
  ctx.fillText("-5 min", pad, height - 8);
  ctx.fillText("now", width - 36, height - 8);
  const x = (t) => pad + ((t - (now - WINDOW_SECONDS)) / WINDOW_SECONDS) * (width - pad - 8);
  const y = (v) => 8 + (1 - v / max) * (height - pad);
  series.forEach((s, i) => {
    ctx.strokeStyle = COLORS[i % COLORS.length];
    ctx.fillStyle = ctx.strokeStyle;
    ctx.beginPath();
    s.points.forEach(([t, v], j) => (j ? ctx.lineTo(x(t), y(v)) : ctx.moveTo(x(t), y(v))));
    ctx.stroke();
    ctx.fillText(s.name, pad + 120 + (i % 4) * 180, 24 + Math.floor(i / 4) * 14);
  });
}

function drawLive(now) {
  const models = [...new Set(live.samples.flatMap((s) => Object.keys(s.rates)))];
  drawChart(
    $("live-tokens"),
    now,
    models.map((name) => ({ name, points: live.samples.map((s) => [s.time, s.rates[name] || 0]) })),
    "tok/s"
  );
  drawChart($("live-running"), now, [{ name: "running", points: live.samples.map((s) => [s.time, s.running]) }], "requests");
}

// ----------------------------------------------------------------- start

async function start() {
  setUpTabs();
  setUpCompare();
  setUpPrompt();
  setUpChat();
  setUpModels();
  $("key-form").addEventListener("submit", () => {});
  try {
    const [models, templates] = await Promise.all([getJson("/v1/models"), getJson("/v1/templates")]);
    state.models = models.data;
    state.templates = templates.data;
  } catch (e) {
    status(`Cannot reach the server: ${e.message}`, true);
    return;
  }
  fillSelect($("compare-template"), templateOptions());
  fillSelect($("prompt-template"), templateOptions());
  fillSelect($("prompt-model"), modelOptions());
  fillSelect($("chat-model"), modelOptions());
  variablesForm($("compare-vars"), state.templates[0], "compare-var");
  showTemplate();
  const ids = state.models.map((m) => m.id);
  const base = state.models.find((m) => m.kind === "base")?.id || ids[0];
  const pick = (id) => (ids.includes(id) ? id : base);
  addColumn(base);
  addColumn(pick("pirate"));
  addColumn(pick("pirate-chat"));
  await refreshModels();
  status(`Connected: ${ids.length} model ids`);
  document.body.dataset.ready = "true";
  pollMetrics();
  setInterval(pollMetrics, 2000);
}

start();

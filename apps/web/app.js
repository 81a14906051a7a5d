// The together web page: a streaming chat and a live view of the ring. No build step, no CDN.
// Every text that comes from the server or the user goes into the DOM through textContent.
"use strict";

const $ = (id) => document.getElementById(id);
const POLL_MS = 1000;

const state = {
  history: [],        // [{role, content}] of the conversation, system prompt excluded
  controller: null,   // AbortController of the answer being streamed
  models: [],
  conv: 0,            // bumped by Clear, so a late end of an aborted answer leaves the new conversation alone
};

// ---------------------------------------------------------------- helpers

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

// The message of an OpenAI-shaped error body ({"error": {"message": ...}}), else the raw text.
async function errorText(resp) {
  const raw = await resp.text();
  let msg = raw;
  try {
    const j = JSON.parse(raw);
    if (j && j.error) msg = typeof j.error === "string" ? j.error : (j.error.message || JSON.stringify(j.error));
  } catch (_) { /* not JSON: show the text as is */ }
  return `HTTP ${resp.status}${resp.statusText ? " " + resp.statusText : ""}: ${msg || "(no body)"}`;
}

function showError(msg) {
  const e = $("error");
  e.textContent = msg;
  e.hidden = !msg;
}

function gib(bytes) {
  if (bytes === undefined || bytes === null) return "?";
  return (bytes / 2 ** 30).toFixed(2) + " GiB";
}

function shortModel(id) {
  const parts = String(id).split(/[\\/]/);
  return parts[parts.length - 1] || String(id);
}

// ---------------------------------------------------------------- models

async function loadModels() {
  try {
    const r = await fetch("/v1/models", { headers: headers(false) });
    if (!r.ok) return false;
    const ids = ((await r.json()).data || []).map((m) => m.id);
    if (!ids.length || ids.join("\n") === state.models.join("\n")) return ids.length > 0;
    state.models = ids;
    const sel = $("model"), keep = sel.value;
    sel.replaceChildren();
    for (const id of ids) {
      const o = el("option", null, shortModel(id));
      o.value = id;
      o.title = id;
      sel.append(o);
    }
    sel.value = ids.includes(keep) ? keep : ids[0];
    sel.disabled = ids.length < 2;
    return true;
  } catch (_) {
    return false;
  }
}

// ---------------------------------------------------------------- chat

function addMessage(role, text) {
  $("empty")?.remove();
  const m = el("div", "msg " + role);
  m.dataset.role = role;
  m.append(el("span", "role", role), el("span", "content", text));
  $("messages").append(m);
  scrollDown();
  return m;
}

function scrollDown() {
  const box = $("messages");
  box.scrollTop = box.scrollHeight;
}

function note(msgEl, text) {
  msgEl.append(el("span", "note", text));
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

function numberField(id, parse) {
  const raw = $(id).value.trim();
  if (raw === "") return undefined;
  const v = parse(raw);
  if (Number.isNaN(v)) throw new Error(`${id} must be a number`);
  return v;
}

function requestBody() {
  const sys = $("system").value.trim();
  const messages = (sys ? [{ role: "system", content: sys }] : []).concat(state.history);
  const body = {
    model: $("model").value || state.models[0],
    messages,
    stream: true,
    stream_options: { include_usage: true },
  };
  const fields = { temperature: parseFloat, top_p: parseFloat, top_k: (s) => parseInt(s, 10),
                   max_tokens: (s) => parseInt(s, 10) };
  for (const [k, parse] of Object.entries(fields)) {
    const v = numberField(k, parse);
    if (v !== undefined) body[k] = v;
  }
  return body;
}

// Yields the JSON payloads of the SSE `data:` lines of a response; returns on `data: [DONE]`.
async function* sseEvents(resp) {
  const reader = resp.body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    let nl;
    while ((nl = buf.indexOf("\n")) >= 0) {
      const line = buf.slice(0, nl).replace(/\r$/, "");
      buf = buf.slice(nl + 1);
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
  throw new Error("the stream ended before [DONE]");
}

async function send() {
  if (state.controller) return;
  const text = $("prompt").value;
  if (!text.trim()) return;
  showError("");
  if (!state.models.length) await loadModels();
  let body;
  state.history.push({ role: "user", content: text });
  try {
    body = requestBody();
  } catch (e) {
    state.history.pop();
    showError(e.message);
    return;
  }
  const userEl = addMessage("user", text);
  $("prompt").value = "";

  const controller = new AbortController();
  const conv = state.conv;
  state.controller = controller;
  setBusy(true);
  $("tps").textContent = "… tok/s";

  let answer = "", asstEl = null, usage = null, chunks = 0, tFirst = null, tLast = null;
  const content = () => asstEl.querySelector(".content");
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(true), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    asstEl = addMessage("assistant", "");
    asstEl.classList.add("streaming");
    for await (const ev of sseEvents(resp)) {
      if (ev.error) throw new Error("error from the mesh: " + (ev.error.message || JSON.stringify(ev.error)));
      if (ev.usage) usage = ev.usage;
      const delta = ev.choices && ev.choices[0] && ev.choices[0].delta;
      if (delta && delta.content) {
        const now = performance.now();
        if (tFirst === null) tFirst = now;
        tLast = now;
        chunks += 1;
        answer += delta.content;
        content().textContent = answer;
        scrollDown();
      }
    }
    tLast = performance.now();
    if (conv === state.conv) state.history.push({ role: "assistant", content: answer });
  } catch (e) {
    const stopped = e.name === "AbortError";
    if (conv !== state.conv) {
      // cleared meanwhile: nothing of this answer belongs to the new conversation
    } else if (asstEl) {
      // keep what arrived: the conversation can go on from a stopped or broken answer
      if (answer) state.history.push({ role: "assistant", content: answer });
      else state.history.pop();
      note(asstEl, stopped ? "stopped" : "interrupted");
    } else {
      state.history.pop();
      userEl.classList.add("failed");
      if (!$("prompt").value) $("prompt").value = text;
    }
    if (!stopped && conv === state.conv) showError(e.message || String(e));
  } finally {
    asstEl?.classList.remove("streaming");
    if (state.controller === controller) {
      state.controller = null;
      setBusy(false);
    }
    if (conv === state.conv) showSpeed(usage ? usage.completion_tokens : chunks, tFirst, tLast, !usage);
  }
}

function showSpeed(tokens, tFirst, tLast, approx) {
  // tokens per second of the answer (the server's usage count, else text chunks): the tokens after
  // the first, over the time from the first to the last
  const tps = $("tps");
  if (tFirst === null || tLast === null || tLast <= tFirst || tokens < 2) {
    tps.textContent = "– tok/s";
    tps.dataset.value = "";
    return;
  }
  const secs = (tLast - tFirst) / 1000, rate = (tokens - 1) / secs;
  tps.dataset.value = rate.toFixed(2);
  tps.textContent = `${rate.toFixed(1)} tok/s${approx ? " (approx.)" : ""} · ${tokens} tokens in ${secs.toFixed(2)} s`;
}

function stop() {
  state.controller?.abort();
}

function clearChat() {
  stop();
  state.controller = null;
  setBusy(false);
  state.conv += 1;
  state.history = [];
  $("messages").replaceChildren(el("p", "empty", "No messages yet. Ask the mesh something."));
  $("messages").firstChild.id = "empty";
  showError("");
  $("tps").textContent = "– tok/s";
  $("tps").dataset.value = "";
}

// ---------------------------------------------------------------- mesh status

function peerBox(p, stage, mesh) {
  const backend = (p && p.backend) || (stage && stage.backend) || "?";
  const name = (p && p.name) || (stage && stage.name) || "?";
  const layers = stage ? [stage.start, stage.end] : (p && p.layers);
  const ready = stage ? stage.ready : !!(p && p.ready);
  const standby = p ? p.standby : !stage;
  const stateName = standby ? "standby" : ready ? "ready" : "loading";

  const box = el("div", "peer");
  box.dataset.name = name;
  box.dataset.backend = backend;
  box.dataset.state = stateName;
  if (layers) box.dataset.layers = `${layers[0]}-${layers[1]}`;
  if (p && p.node_id) box.dataset.nodeId = p.node_id;

  box.append(el("span", "name", name));
  const tags = el("span", "tags");
  tags.append(el("span", "tag backend backend-" + backend, backend), el("span", "tag state " + stateName, stateName));
  if (p && p.coordinator) tags.append(el("span", "tag coordinator", "coordinator"));
  if (p && p.api) tags.append(el("span", "tag api", "API " + p.api));
  if (p && p.node_id === mesh.self) tags.append(el("span", "tag self", "this page"));
  box.append(tags);

  const d = el("div", "details");
  const item = (label, value, cls) => {
    const s = el("span", cls);
    s.append(document.createTextNode(label + " "), el("b", null, value));
    d.append(s);
  };
  item("layers", layers ? `[${layers[0]}, ${layers[1]})` : "none", "layers");
  item("memory", p ? gib(p.free_memory) : "?", "memory");
  item("speed", p && p.tokens_per_s ? `${p.tokens_per_s} tok/s` : "–", "speed");
  if (p && p.dtype) item("runs", `${p.dtype} · ${p.weight_format || p.dtype}`, "runs");
  if (p && p.layer_ms) item("layer", `${p.layer_ms.toFixed(2)} ms`, "layer-ms");
  if (p && p.weights) item("weights", p.weights, "weights");  // fetching its slice from peers
  if (p && p.training) item("training", p.training, "training");  // its part in a LoRA training job
  if (stage && stage.address) item("at", stage.address, "address");
  box.append(d);

  if (layers && mesh.num_layers) {
    const bar = el("div", "layerbar");
    const fill = el("span");
    fill.style.left = (100 * layers[0] / mesh.num_layers) + "%";
    fill.style.width = (100 * (layers[1] - layers[0]) / mesh.num_layers) + "%";
    bar.append(fill);
    bar.title = `layers ${layers[0]}–${layers[1]} of ${mesh.num_layers}`;
    box.append(bar);
  }
  return box;
}

function renderMesh(mesh) {
  const peers = new Map((mesh.peers || []).map((p) => [p.node_id, p]));
  const stages = (mesh.ring || []).slice().sort((a, b) => a.start - b.start);

  $("mesh-meta").textContent =
    `${shortModel(mesh.model)} · ${mesh.num_layers} layers · epoch ${mesh.epoch} · ${peers.size} peer${peers.size === 1 ? "" : "s"}`;

  const banner = $("banner");
  banner.classList.remove("down");
  if (mesh.complete) {
    banner.hidden = true;
    banner.textContent = "";
  } else {
    banner.hidden = false;
    banner.textContent = "Ring incomplete" + (mesh.missing ? ": " + mesh.missing : "") +
      ". Requests are refused (503) until it is complete again.";
  }
  setHealth(mesh.complete ? "ok" : "incomplete", mesh.complete ? "ring complete" : "ring incomplete");

  // the ring, stage 0 first; a gap in the layers is drawn where it is
  const ring = $("ring");
  ring.replaceChildren();
  let at = 0;
  const arrow = () => ring.childNodes.length && ring.append(el("div", "arrow", "↓"));
  for (const st of stages) {
    if (st.start > at) {
      arrow();
      ring.append(el("div", "gap", `layers [${at}, ${st.start}) missing`));
    }
    arrow();
    ring.append(peerBox(peers.get(st.node_id), st, mesh));
    at = Math.max(at, st.end);
  }
  if (mesh.num_layers && at < mesh.num_layers) {
    arrow();
    ring.append(el("div", "gap", `layers [${at}, ${mesh.num_layers}) missing`));
  }
  if (stages.length) ring.append(el("div", "arrow back", "↺ the last stage samples and sends the token id back to stage 0"));

  const inRing = new Set(stages.map((s) => s.node_id));
  const rest = (mesh.peers || []).filter((p) => !inRing.has(p.node_id));
  const sb = $("standby");
  sb.replaceChildren();
  if (!rest.length) sb.append(el("p", "empty", "none"));
  for (const p of rest) sb.append(peerBox(p, null, mesh));

  const s = mesh.scheduler || {};
  const dl = $("sched");
  dl.replaceChildren();
  const kv = (k, v) => dl.append(el("dt", null, k), el("dd", null, v));
  kv("running", s.running ?? "?");
  kv("waiting", s.waiting ?? "?");
  if (s.step_ms_p50 != null) kv("step p50", s.step_ms_p50.toFixed(1) + " ms");
  if (s.hop_overhead_ms_p50 != null) kv("hop overhead p50 / p90",
    `${s.hop_overhead_ms_p50.toFixed(2)} / ${(s.hop_overhead_ms_p90 ?? 0).toFixed(2)} ms`);
  const sp = s.speculation || {};
  if (sp.draft && sp.draft !== "off") kv(`drafts (${sp.draft})`, sp.drafted_tokens
    ? `${(100 * sp.acceptance).toFixed(0)}% of ${sp.drafted_tokens} accepted` : "none yet");
  if (mesh.bytes_per_token_hop) kv("bytes per token per hop", mesh.bytes_per_token_hop);
  if (mesh.stage_tokens_per_s) kv("this stage", mesh.stage_tokens_per_s.toFixed(1) + " tok/s");
  dl.dataset.running = String(s.running ?? "");
  renderLinks(mesh);
}

function renderLinks(mesh) {
  // what the plan predicts next to what this peer measures, and every peer's measured links
  const sp = mesh.speed || {};
  const parts = [];
  if (sp.predicted_tokens_per_s) parts.push(`predicted ${sp.predicted_tokens_per_s.toFixed(1)} tok/s`);
  if (sp.measured_tokens_per_s) parts.push(`measured ${sp.measured_tokens_per_s.toFixed(1)} tok/s`);
  const rs = $("ring-speed");
  rs.textContent = parts.length ? parts.join(" · ") + (sp.limit ? ` (limit: ${sp.limit})` : "") : "";
  rs.dataset.predicted = sp.predicted_tokens_per_s ?? "";
  rs.dataset.measured = sp.measured_tokens_per_s ?? "";
  const body = $("links").querySelector("tbody");
  body.replaceChildren();
  for (const p of mesh.peers || []) {
    for (const ln of p.links || []) {
      const tr = el("tr");
      tr.dataset.from = p.name;
      tr.dataset.to = ln.to_name;
      tr.dataset.rtt = ln.rtt_ms;
      for (const v of [p.name, ln.to_name, `${ln.rtt_ms.toFixed(2)} ms`, mbit(ln.mbps), `${Math.round(ln.age_s)} s ago`]) {
        tr.append(el("td", null, v));
      }
      body.append(tr);
    }
  }
  if (!body.childNodes.length) {
    const tr = el("tr", "empty");
    const td = el("td", null, "not measured yet");
    td.colSpan = 5;
    tr.append(td);
    body.append(tr);
  }
}

function mbit(mbps) {
  return mbps >= 1000 ? `${(mbps / 1000).toFixed(1)} Gbit/s` : `${mbps.toFixed(0)} Mbit/s`;
}

function setHealth(st, text) {
  const h = $("health");
  h.dataset.state = st;
  h.textContent = text;
}

function renderDown(msg) {
  const banner = $("banner");
  banner.hidden = false;
  banner.classList.add("down");
  banner.textContent = msg;
  setHealth("down", "unreachable");
}

async function pollMesh() {
  try {
    const r = await fetch("/v1/mesh", { headers: headers(false), signal: AbortSignal.timeout(3000) });
    if (r.ok) {
      renderMesh(await r.json());
      if (!state.models.length) loadModels();
    } else {
      renderDown("Cannot read the mesh status: " + await errorText(r));
    }
  } catch (e) {
    renderDown("This peer's API does not answer (" + (e.message || e) + ").");
  } finally {
    setTimeout(pollMesh, POLL_MS);
  }
}

// ---------------------------------------------------------------- wiring

function init() {
  const saved = localStorage.getItem("together.api_key");
  if (saved) $("api_key").value = saved;
  $("api_key").addEventListener("change", () => {
    localStorage.setItem("together.api_key", $("api_key").value.trim());
    loadModels();
  });
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  $("stop").addEventListener("click", stop);
  $("clear").addEventListener("click", clearChat);
  setBusy(false);
  loadModels();
  pollMesh();
}

init();

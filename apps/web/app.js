// The together web page: a streaming chat and a live view of the mesh. No build step, no CDN.
// Loaded after vendor/ (marked, DOMPurify), markdown.js, store.js and mesh.js.
// Every text from the server or the user goes into the DOM through textContent, but for an answer's
// Markdown, which goes through Markdown.render (raw HTML shown as text, then sanitised).
"use strict";

const $ = (id) => document.getElementById(id);

const state = {
  store: null,        // Store.load(): {current, chats}
  controller: null,   // AbortController of the answer being streamed
  models: [],
  ringSig: null,      // the rings' models, completeness and adapters at the last menu refresh
  conv: 0,            // bumped by Clear / New chat / a switch, so a late end of an answer stays in its own chat
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

// The menu: one group per ring's model, its adapters (MODEL+ADAPTER) under it, in /v1/models' order.
async function loadModels() {
  try {
    const r = await fetch("/v1/models", { headers: headers(false) });
    if (!r.ok) return false;
    const ids = ((await r.json()).data || []).map((m) => m.id);
    if (!ids.length || ids.join("\n") === state.models.join("\n")) return ids.length > 0;
    state.models = ids;
    const sel = $("model"), keep = sel.value, saved = Store.model();
    sel.replaceChildren();
    const groups = new Map();
    for (const id of ids) {
      const plus = id.indexOf("+");
      const base = plus > 0 ? id.slice(0, plus) : id;
      if (!groups.has(base)) {
        const g = el("optgroup");
        g.label = shortModel(base);
        groups.set(base, g);
        sel.append(g);
      }
      const o = el("option", null, plus > 0 ? `${shortModel(base)} + ${id.slice(plus + 1)}` : shortModel(id));
      o.value = id;
      o.title = id;
      groups.get(base).append(o);
    }
    sel.value = ids.includes(saved) ? saved : ids.includes(keep) ? keep : ids[0];
    sel.disabled = ids.length < 2;
    return true;
  } catch (_) {
    return false;
  }
}

function onRings(rings) {
  const sig = rings.map((r) => `${r.model}|${!!r.complete}|${(r.adapters || []).join(",")}`).join("\n");
  if (sig !== state.ringSig || !state.models.length) {
    state.ringSig = sig;
    loadModels();
  }
}

// ---------------------------------------------------------------- conversations

const chat = () => state.store.chats.find((c) => c.id === state.store.current);

function saveChats() {
  chat().updated = Date.now();
  Store.save(state.store);
  renderChatList();
}

function renderChatList() {
  const list = $("chats");
  list.replaceChildren();
  for (const c of state.store.chats) {
    if (!c.messages.length && c.id !== state.store.current) continue;
    const li = el("li", c.id === state.store.current ? "chat current" : "chat");
    li.dataset.id = c.id;
    const open = el("button", "open", Store.title(c));
    open.type = "button";
    open.title = Store.title(c);
    open.addEventListener("click", () => switchChat(c.id));
    const del = el("button", "delete", "×");
    del.type = "button";
    del.title = "delete this conversation";
    del.addEventListener("click", () => deleteChat(c.id));
    li.append(open, del);
    list.append(li);
  }
}

function showChat() {
  const box = $("messages");
  box.replaceChildren();
  const c = chat();
  if (!c.messages.length) {
    const p = el("p", "empty", "No messages yet. Ask the mesh something.");
    p.id = "empty";
    box.append(p);
  }
  for (const m of c.messages) {
    const e = addMessage(m.role, m.content, m.model);
    if (m.note) note(e, m.note);
  }
  showError("");
  showSpeed(0, null, null, false);
}

// Leaves the answer being streamed (it stays, stopped, in the chat it belongs to) and shows another.
function leave() {
  stop();
  state.controller = null;
  setBusy(false);
  state.conv += 1;
}

function switchChat(id) {
  if (id === state.store.current) return;
  leave();
  state.store.current = id;
  Store.save(state.store);
  renderChatList();
  showChat();
}

function newChat() {
  leave();
  const c = Store.fresh();
  state.store.chats.unshift(c);
  state.store.current = c.id;
  saveChats();
  showChat();
  $("prompt").focus();
}

function deleteChat(id) {
  if (id === state.store.current) leave();
  state.store.chats = state.store.chats.filter((c) => c.id !== id);
  if (!state.store.chats.length) state.store.chats.push(Store.fresh());
  if (!chat()) state.store.current = state.store.chats[0].id;
  saveChats();
  showChat();
}

// Clear: empties the conversation on screen (and forgets it).
function clearChat() {
  leave();
  chat().messages = [];
  saveChats();
  showChat();
}

// ---------------------------------------------------------------- chat

function addMessage(role, text, model) {
  $("empty")?.remove();
  const m = el("div", "msg " + role);
  m.dataset.role = role;
  const label = el("span", "role", role);
  if (role === "assistant" && model) {
    label.append(el("span", "model", " · " + shortModel(model)));
    m.dataset.model = model;
  }
  const content = el("div", "content");
  m.append(label, content);
  if (role === "assistant") {
    content.classList.add("md");
    Markdown.render(content, text);
  } else {
    content.textContent = text;
  }
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

function requestBody(history) {
  const sys = $("system").value.trim();
  const messages = (sys ? [{ role: "system", content: sys }] : [])
    .concat(history.map((m) => ({ role: m.role, content: m.content })));
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
  const c = chat(), conv = state.conv;
  let body;
  try {
    body = requestBody(c.messages.concat([{ role: "user", content: text }]));
  } catch (e) {
    showError(e.message);
    return;
  }
  const userMsg = { role: "user", content: text };
  c.messages.push(userMsg);
  saveChats();
  const userEl = addMessage("user", text);
  $("prompt").value = "";

  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  $("tps").textContent = "… tok/s";

  let answer = "", asstEl = null, view = null, reply = null, usage = null, chunks = 0, tFirst = null, tLast = null;
  const mine = () => conv === state.conv;
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(true), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    reply = { role: "assistant", content: "", model: body.model };
    c.messages.push(reply);
    if (mine()) {
      asstEl = addMessage("assistant", "", body.model);
      asstEl.classList.add("streaming");
      view = Markdown.streamer(asstEl.querySelector(".content"));
    }
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
        reply.content = answer;
        if (view && mine()) {
          view.update(answer);
          scrollDown();
        }
      }
    }
    tLast = performance.now();
  } catch (e) {
    const stopped = e.name === "AbortError";
    if (reply) {
      // keep what arrived: the conversation can go on from a stopped or broken answer
      reply.note = stopped ? "stopped" : "interrupted";
      if (!answer) c.messages.splice(c.messages.indexOf(reply), 1);
      if (asstEl && mine()) note(asstEl, reply.note);
      if (!answer) c.messages.splice(c.messages.indexOf(userMsg), 1);
    } else {
      c.messages.splice(c.messages.indexOf(userMsg), 1);
      if (mine()) {
        userEl.classList.add("failed");
        if (!$("prompt").value) $("prompt").value = text;
      }
    }
    if (!stopped && mine()) showError(e.message || String(e));
  } finally {
    if (view && mine()) view.finish(answer);
    asstEl?.classList.remove("streaming");
    if (state.controller === controller) {
      state.controller = null;
      setBusy(false);
    }
    if (state.store.chats.includes(c)) {
      c.updated = Date.now();
      Store.save(state.store);
      if (mine()) renderChatList();
    }
    if (mine()) showSpeed(usage ? usage.completion_tokens : chunks, tFirst, tLast, !usage);
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

// ---------------------------------------------------------------- wiring

function init() {
  const saved = localStorage.getItem("together.api_key");
  if (saved) $("api_key").value = saved;
  $("api_key").addEventListener("change", () => {
    localStorage.setItem("together.api_key", $("api_key").value.trim());
    state.models = [];
    loadModels();
  });
  $("model").addEventListener("change", () => Store.setModel($("model").value));
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  $("stop").addEventListener("click", stop);
  $("clear").addEventListener("click", clearChat);
  $("new-chat").addEventListener("click", newChat);
  state.store = Store.load();
  renderChatList();
  showChat();
  setBusy(false);
  loadModels();
  pollMesh(onRings);
}

init();

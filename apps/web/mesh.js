// The live view of the mesh: one block per model's ring (GET /v1/mesh `rings`; an older peer without
// it sends only its own ring), standby peers, the scheduler and the measured links.
// Every text from the server goes into the DOM through textContent.
"use strict";

const POLL_MS = 1000;

// The rings of the mesh, this peer's own first. A peer that does not send `rings` has one ring.
function meshRings(mesh) {
  if (Array.isArray(mesh.rings) && mesh.rings.length) {
    const own = mesh.rings.filter((r) => r.self);
    return own.length ? own.concat(mesh.rings.filter((r) => !r.self)) : mesh.rings;
  }
  return [{ model: mesh.model, complete: mesh.complete, missing: mesh.missing, epoch: mesh.epoch,
            num_layers: mesh.num_layers, ring: mesh.ring || [], api: [], adapters: mesh.adapters || [], self: true }];
}

function peerBox(p, stage, ctx) {
  // a peer of another model's ring may be known only by its stage item (which may carry its speed)
  if (!p && stage && (stage.tokens_per_s != null || stage.free_memory != null || stage.api)) p = stage;
  const backend = (p && p.backend) || (stage && stage.backend) || "?";
  const name = (p && p.name) || (stage && stage.name) || "?";
  const layers = stage ? [stage.start, stage.end] : (p && p.layers);
  const ready = stage ? stage.ready : !!(p && p.ready);
  const standby = !stage;
  const stateName = standby ? "standby" : ready ? "ready" : "loading";

  const box = el("div", "peer");
  box.dataset.name = name;
  box.dataset.backend = backend;
  box.dataset.state = stateName;
  if (layers) box.dataset.layers = `${layers[0]}-${layers[1]}`;
  const id = (p && p.node_id) || (stage && stage.node_id);
  if (id) box.dataset.nodeId = id;

  box.append(el("span", "name", name));
  const tags = el("span", "tags");
  tags.append(el("span", "tag backend backend-" + backend, backend), el("span", "tag state " + stateName, stateName));
  if (p && p.coordinator) tags.append(el("span", "tag coordinator", "coordinator"));
  if (p && p.api) tags.append(el("span", "tag api", "API " + p.api));
  if (id && id === ctx.self) tags.append(el("span", "tag self", "this page"));
  box.append(tags);

  const d = el("div", "details");
  const item = (label, value, cls) => {
    const s = el("span", cls);
    s.append(document.createTextNode(label + " "), el("b", null, value));
    d.append(s);
  };
  item("layers", layers ? `[${layers[0]}, ${layers[1]})` : "none", "layers");
  item("memory", p ? gib(p.free_memory) : "?", "memory");
  // tokens (frame positions) per second of this peer's compute, as it reports it
  item("speed", p && p.tokens_per_s ? `${Number(p.tokens_per_s).toFixed(1)} tok/s` : "–", "speed");
  if (p && p.dtype) item("runs", `${p.dtype} · ${p.weight_format || p.dtype}`, "runs");
  if (p && p.layer_ms) item("layer", `${p.layer_ms.toFixed(2)} ms`, "layer-ms");
  if (p && p.weights) item("weights", p.weights, "weights");  // fetching its slice from peers
  if (p && p.training) item("training", p.training, "training");  // its part in a LoRA training job
  if (stage && stage.address) item("at", stage.address, "address");
  box.append(d);

  if (layers && ctx.num_layers) {
    const bar = el("div", "layerbar");
    const fill = el("span");
    fill.style.left = (100 * layers[0] / ctx.num_layers) + "%";
    fill.style.width = (100 * (layers[1] - layers[0]) / ctx.num_layers) + "%";
    bar.append(fill);
    bar.title = `layers ${layers[0]}–${layers[1]} of ${ctx.num_layers}`;
    box.append(bar);
  }
  return box;
}

// Today's token path, drawn top to bottom: the API peer sends token ids to stage 0, hidden states go
// stage to stage, the last stage samples and sends the token ids straight back to the API peer.
function drawRing(box, ring, peers, self) {
  const stages = (ring.ring || []).slice().sort((a, b) => a.start - b.start);
  const ctx = { num_layers: ring.num_layers, self };
  box.replaceChildren();
  if (!stages.length) {
    box.append(el("p", "empty", "no stages yet"));
    return;
  }
  const api = apiNames(ring, peers);
  const inArrow = el("div", "arrow in", `token ids from the API peer${api ? " (" + api + ")" : ""} ↓`);
  inArrow.title = "the API peer tokenizes the prompt and sends token ids to stage 0";
  box.append(inArrow);
  let at = 0, first = true;
  const arrow = () => {
    if (first) { first = false; return; }
    const a = el("div", "arrow", "↓ hidden states");
    a.title = "each stage sends its hidden states to the next";
    box.append(a);
  };
  for (const st of stages) {
    if (st.start > at) {
      arrow();
      box.append(el("div", "gap", `layers [${at}, ${st.start}) missing`));
    }
    arrow();
    box.append(peerBox(peers.get(st.node_id), st, ctx));
    at = Math.max(at, st.end);
  }
  if (ring.num_layers && at < ring.num_layers) {
    arrow();
    box.append(el("div", "gap", `layers [${at}, ${ring.num_layers}) missing`));
  }
  box.append(el("div", "arrow back", "↺ the last stage samples; token ids go straight back to the API peer" +
    (api ? " (" + api + ")" : "") + ", not to stage 0"));
}

// The names of a ring's API peers (their peer names where known, else their URLs).
function apiNames(ring, peers) {
  const names = [];
  for (const st of ring.ring || []) {
    const p = peers.get(st.node_id) || st;
    if (p.api) names.push(p.name || st.name);
  }
  if (!names.length) for (const u of ring.api || []) names.push(String(u).replace(/^https?:\/\//, ""));
  return names.join(", ");
}

function ringHead(block, ring) {
  const head = el("div", "ring-head");
  head.append(el("span", "ring-model", shortModel(ring.model)));
  head.lastChild.title = ring.model;
  const st = ring.complete ? "complete" : "incomplete";
  head.append(el("span", "tag ring-state " + st, st));
  if (ring.self) head.append(el("span", "tag self", "this peer's ring"));
  head.append(el("span", "meta", `${ring.num_layers ?? "?"} layers · epoch ${ring.epoch ?? "?"}`));
  if (ring.adapters && ring.adapters.length) head.append(el("span", "meta", "adapters: " + ring.adapters.join(", ")));
  if (!ring.complete && ring.missing) head.append(el("span", "missing", ring.missing));
  block.dataset.model = ring.model;
  block.dataset.complete = String(!!ring.complete);
  block.replaceChildren(head);
}

function renderMesh(mesh) {
  const peers = new Map((mesh.peers || []).map((p) => [p.node_id, p]));
  const rings = meshRings(mesh);

  $("mesh-meta").textContent = `${shortModel(mesh.model)} · ${mesh.num_layers} layers · epoch ${mesh.epoch} · ` +
    `${peers.size} peer${peers.size === 1 ? "" : "s"}` + (rings.length > 1 ? ` · ${rings.length} rings` : "");

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

  // this peer's ring in the first block (#ring), every other model's ring in a block of its own
  const own = $("self-ring");
  const ringEl = $("ring");
  ringHead(own, rings[0]);
  own.append(ringEl);
  drawRing(ringEl, rings[0], peers, mesh.self);
  const others = $("other-rings");
  others.replaceChildren();
  for (const r of rings.slice(1)) {
    const block = el("section", "ring-block");
    ringHead(block, r);
    const box = el("div", "ring");
    drawRing(box, r, peers, mesh.self);
    block.append(box);
    others.append(block);
  }

  const inRing = new Set(rings.flatMap((r) => (r.ring || []).map((s) => s.node_id)));
  const rest = (mesh.peers || []).filter((p) => !inRing.has(p.node_id));
  const sb = $("standby");
  sb.replaceChildren();
  if (!rest.length) sb.append(el("p", "empty", "none"));
  for (const p of rest) sb.append(peerBox(p, null, { num_layers: mesh.num_layers, self: mesh.self }));

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
  return rings;
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

// Polls /v1/mesh; `onRings` hears the rings (to refresh the model menu when they change).
async function pollMesh(onRings) {
  try {
    const r = await fetch("/v1/mesh", { headers: headers(false), signal: AbortSignal.timeout(3000) });
    if (r.ok) onRings(renderMesh(await r.json()));
    else renderDown("Cannot read the mesh status: " + await errorText(r));
  } catch (e) {
    renderDown("This peer's API does not answer (" + (e.message || e) + ").");
  } finally {
    setTimeout(() => pollMesh(onRings), POLL_MS);
  }
}

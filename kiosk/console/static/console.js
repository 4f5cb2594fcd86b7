// gate-kiosk console: the overview and the live view of one gate. Plain JS, no external assets.
"use strict";

const page = document.body.dataset.page;

async function getJSON(url) {
  const response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
  if (response.status === 401) { window.location = "/login"; throw new Error("logged out"); }
  if (!response.ok) throw new Error(url + ": " + response.status);
  return response.json();
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value; else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

function clock(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleTimeString() : "";
}

function ms(q) {
  return q && q.p50 !== undefined ? `${Math.round(q.p50)} / ${Math.round(q.p99)} ms` : "–";
}

function describe(e) {
  if (e.type === "accept") return `ACCEPT ${e.subject_id || ""}`;
  if (e.type === "reject") return `REJECT ${e.reason || ""}${e.subject_id ? " · " + e.subject_id : ""}`;
  return `${e.type.toUpperCase()} ${e.reason || ""}`;
}

function feedItem(e) {
  const crop = e.has_crop
    ? el("img", { src: `/api/crops/${encodeURIComponent(e.event_id)}`, alt: "face this decision was made on" })
    : el("div", { class: "nocrop" });
  const score = e.score !== null && e.score !== undefined ? `score ${Number(e.score).toFixed(3)}` : "";
  const latency = e.latency_ms ? `${Math.round(e.latency_ms)} ms` : "";
  const flight = e.flight_id ? `flight ${e.flight_id}` : "";
  const meta = [clock(e.decided_at), `gate ${e.gate_id}`, flight, score, latency].filter(Boolean).join(" · ");
  const item = el("li", { class: `type-${e.type}` + (e.alert ? " alert" : ""), "data-event-id": e.event_id || "" },
    crop, el("div", {}, el("div", { class: "what" }, describe(e)), el("div", { class: "meta" }, meta)));
  return item;
}

function setPill(node, label, state) {
  node.textContent = `${label}: ${state}`;
  node.className = `pill ${state}`;
}

async function refreshFeed(gate) {
  const query = gate ? `?gate=${encodeURIComponent(gate)}&limit=30` : "?limit=40";
  const data = await getJSON("/api/events" + query);
  document.getElementById("feed").replaceChildren(...data.events.map(feedItem));
}

function gateCard(g) {
  const flight = g.flight_id
    ? `${g.flight_id}` + (g.flight ? ` · ${g.flight.boarded} boarded, ${g.flight.remaining} to go` : "")
    : (g.gallery_subjects !== null && g.gallery_subjects !== undefined ? `1:N · ${g.gallery_subjects} enrolled` : "");
  const last = g.last_decision;
  return el("a", { class: "gate-card", href: `/gate/${encodeURIComponent(g.gate_id)}`, "data-gate": g.gate_id },
    el("h3", {}, el("span", {}, g.gate_id), el("span", { class: `pill ${g.camera_state}` }, `camera ${g.camera_state}`)),
    el("div", { class: "row" }, el("span", { class: "muted" }, "boarding"), el("span", {}, flight || "–")),
    el("div", { class: "row" }, el("span", { class: "muted" }, "processing"), el("span", {}, `${g.fps} fps`)),
    el("div", { class: "decision" + (last && last.alert ? " alert" : "") },
      last ? `${describe(last)} · ${clock(last.decided_at)}` : "no decision yet"));
}

async function refreshOverview() {
  const s = await getJSON("/api/status");
  setPill(document.getElementById("verifier"), "verifier", s.verifier.state);
  document.getElementById("verifier-detail").textContent =
    `${s.verifier.fps ?? "–"} fps · frame ${ms(s.verifier.frame_latency_ms)} · decision ${ms(s.verifier.decision_latency_ms)}`;
  document.getElementById("gates").replaceChildren(...s.gates.map(gateCard));
  const g = s.verifier.gallery || {};
  const system = g.stale ? [el("li", { class: "alert", id: "gallery-stale" },
    `gallery stale: ${g.error || "?"} · refusing ${g.refusing || "?"}` +
    (g.accepts_from_memory_s ? ` (accepts from memory for ${Math.round(g.accepts_from_memory_s)} s more)` : "") +
    (g.action ? ` · ${g.action}` : ""))] : [];
  const items = s.alerts.map((a) => el("li", {}, `${clock(a.decided_at)} · gate ${a.gate_id} · ${describe(a)}`));
  document.getElementById("alerts").replaceChildren(...(system.length + items.length ? [...system, ...items]
    : [el("li", { class: "muted" }, "none")]));
}

function drawFaces(header) {
  const boxes = document.getElementById("boxes");
  boxes.replaceChildren(...header.faces.map((f) => {
    const [x1, y1, x2, y2] = f.box;
    const box = el("div", { class: `face-box ${f.state}`, "data-track": String(f.track_id) });
    box.style.left = `${(100 * x1) / header.width}%`;
    box.style.top = `${(100 * y1) / header.height}%`;
    box.style.width = `${(100 * (x2 - x1)) / header.width}%`;
    box.style.height = `${(100 * (y2 - y1)) / header.height}%`;
    const label = f.state === "accepted" ? `#${f.track_id} ✓ ${f.subject_id}`
      : f.state === "rejected" ? `#${f.track_id} ✗ ${f.reason || ""}` : `#${f.track_id} checking…`;
    box.append(el("span", {}, label));
    return box;
  }));
}

function startLive(gate) {
  const img = document.getElementById("frame");
  let frames = 0;
  const source = new EventSource(`/api/gates/${encodeURIComponent(gate)}/live`);
  source.addEventListener("frame", (message) => {
    const data = JSON.parse(message.data);
    img.src = "data:image/jpeg;base64," + data.jpeg;
    img.dataset.seq = String(data.header.seq);
    drawFaces(data.header);
    frames += 1;
    document.getElementById("live-note").textContent = "";
    document.getElementById("live-detail").textContent =
      `camera ${data.header.camera_id} · frame ${data.header.seq} · ${data.header.faces.length} face(s) · ${frames} frames shown`;
  });
  source.onerror = () => { document.getElementById("live-note").textContent = "Live view reconnecting…"; };
}

async function refreshGate(gate) {
  const s = await getJSON("/api/status");
  const g = s.gates.find((x) => x.gate_id === gate);
  setPill(document.getElementById("verifier"), "verifier", s.verifier.state);
  if (!g) return;
  setPill(document.getElementById("camera"), "camera", g.camera_state);
  document.getElementById("flight").textContent = g.flight_id
    ? `boarding ${g.flight_id}` + (g.flight ? ` · ${g.flight.boarded}/${g.flight.passengers} boarded` : "") : "";
  const last = g.last_decision;
  document.getElementById("last").textContent = last ? `Last: ${describe(last)} at ${clock(last.decided_at)}` : "";
}

function every(ms, work) {
  const run = () => work().catch((err) => console.warn(err)).finally(() => setTimeout(run, ms));
  run();
}

if (page === "overview") {
  every(1000, refreshOverview);
  every(1000, () => refreshFeed(null));
} else if (page === "gate") {
  const gate = decodeURIComponent(window.location.pathname.split("/").pop());
  document.getElementById("gate-id").textContent = gate;
  document.title = `gate-kiosk console: gate ${gate}`;
  startLive(gate);
  every(1000, () => refreshGate(gate));
  every(1000, () => refreshFeed(gate));
}

// The allinone page: plain DOM, no framework, no external assets. Model output is only ever
// inserted with textContent, never as HTML.
"use strict";

const SESSION_KEY = "allinone.session";
const API_KEY = "allinone.apiKey";
const $ = (id) => document.getElementById(id);
const log = $("log"), form = $("form"), input = $("input"), sendBtn = $("send"), statusBox = $("status");
let busy = false;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = localStorage.getItem(API_KEY);
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function showStatus(text, kind) {
  if (!text) { statusBox.hidden = true; statusBox.textContent = ""; return; }
  statusBox.hidden = false;
  statusBox.className = "status" + (kind === "info" ? " info" : "");
  statusBox.textContent = text;
}

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function clearLog() {
  log.replaceChildren(el("div", "empty", "新对话。输入一句话，先看到情感判断，再看到回复。"));
}

function setSentiment(line, data) {
  line.replaceChildren();
  line.append(document.createTextNode(data.display));
  if (typeof data.probability === "number") {
    line.append(el("span", "prob", "(" + (data.probability * 100).toFixed(1) + "%)"));
  }
}

function addTurn(message) {
  const empty = log.querySelector(".empty");
  if (empty) empty.remove();
  const turn = el("div", "turn");
  const user = el("div", "user", message);
  const sentiment = el("div", "sentiment", "…");
  const roles = el("div", "roles", "");
  const reply = el("div", "reply pending");
  turn.append(user, sentiment, roles, reply);
  log.append(turn);
  log.scrollTop = log.scrollHeight;
  return { turn, sentiment, roles, reply };
}

async function errorMessage(res) {
  let detail = "";
  try { detail = (await res.json()).error.message; } catch (e) { /* not JSON */ }
  if (res.status === 503) {
    const after = res.headers.get("Retry-After");
    return "服务器忙，请稍后再试 / The server is busy" + (after ? ", try again in " + after + " s" : "") + ".";
  }
  if (res.status === 504) return "请求超时 / The request timed out.";
  return "错误 / Error " + res.status + (detail ? ": " + detail : "");
}

// Server-Sent Events over a POST body: parse "event:" / "data:" blocks from the stream.
async function* sseEvents(res) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (data) yield { event, data: JSON.parse(data) };
    }
  }
}

async function send(message) {
  busy = true; sendBtn.disabled = true;
  showStatus("");
  const view = addTurn(message);
  const body = { message, stream: true };
  const sid = localStorage.getItem(SESSION_KEY);
  if (sid) body.session_id = sid;
  let finished = false;
  try {
    let res = await fetch("/v1/respond", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    if (res.status === 401) {
      const key = window.prompt("API key");
      if (key) {
        localStorage.setItem(API_KEY, key);
        res = await fetch("/v1/respond", { method: "POST", headers: headers(), body: JSON.stringify(body) });
      }
    }
    if (!res.ok) {
      view.turn.remove();
      showStatus(await errorMessage(res));
      input.value = message;
      return;
    }
    for await (const { event, data } of sseEvents(res)) {
      if (event === "sentiment") {
        setSentiment(view.sentiment, data);
        localStorage.setItem(SESSION_KEY, data.session_id);
      } else if (event === "annotations") {
        view.roles.textContent = data.display;
      } else if (event === "delta") {
        view.reply.textContent += data.text;
        log.scrollTop = log.scrollHeight;
      } else if (event === "done") {
        finished = true;
        view.reply.dataset.finish = data.finish_reason;
      } else if (event === "error") {
        showStatus("错误 / Error: " + data.error.message);
      }
    }
  } catch (err) {
    showStatus("无法连接服务器 / Cannot reach the server (" + err.message + ").");
  } finally {
    view.reply.classList.remove("pending");
    if (!finished && view.turn.isConnected) view.reply.classList.add("cut");
    if (finished) view.turn.classList.add("done");
    busy = false; sendBtn.disabled = false;
    input.focus();
  }
}

async function restore() {
  const sid = localStorage.getItem(SESSION_KEY);
  clearLog();
  if (!sid) return;
  try {
    const res = await fetch("/v1/sessions/" + encodeURIComponent(sid), { headers: headers() });
    if (res.status === 404) { localStorage.removeItem(SESSION_KEY); return; }
    if (!res.ok) { showStatus(await errorMessage(res)); return; }
    const data = await res.json();
    for (const t of data.turns) {
      const view = addTurn(t.message);
      setSentiment(view.sentiment, t);
      view.roles.textContent = t.annotations_display || "";
      view.reply.textContent = t.reply;
      view.reply.classList.remove("pending");
      view.turn.classList.add("done");
    }
  } catch (err) {
    showStatus("无法连接服务器 / Cannot reach the server.");
  }
}

async function checkHealth() {
  const badge = $("health");
  try {
    const res = await fetch("/healthz", { cache: "no-store" });
    const data = await res.json();
    badge.className = "health " + (res.ok ? "ok" : "down");
    badge.textContent = res.ok ? (data.busy || data.queue_depth ? "忙 / busy" : "在线 / ready") : "不可用 / unhealthy";
  } catch (err) {
    badge.className = "health down";
    badge.textContent = "离线 / down";
  }
}

form.addEventListener("submit", (ev) => {
  ev.preventDefault();
  const message = input.value.trim();
  if (!message || busy) return;
  input.value = "";
  send(message);
});

input.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    form.requestSubmit();
  }
});

$("new").addEventListener("click", async () => {
  const sid = localStorage.getItem(SESSION_KEY);
  localStorage.removeItem(SESSION_KEY);
  clearLog();
  showStatus("");
  if (sid) {
    try { await fetch("/v1/sessions/" + encodeURIComponent(sid), { method: "DELETE", headers: headers() }); }
    catch (err) { /* the server forgets idle sessions anyway */ }
  }
  input.focus();
});

restore();
checkHealth();
setInterval(checkHealth, 15000);

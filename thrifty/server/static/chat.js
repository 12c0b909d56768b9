// thrifty's chat page: conversations kept in localStorage, answers streamed from
// /v1/chat/completions and shown as sanitized Markdown.
"use strict";
const $ = (id) => document.getElementById(id);
const log = $("log"), input = $("input"), keyInput = $("key");
const STORE = "thrifty-conversations", CURRENT = "thrifty-current", SETTINGS = "thrifty-settings";
const SETTING_IDS = ["system", "temperature", "max-tokens", "thinking"];

// A conversation: {id, title, messages}; a message: {role: "user", content} or
// {role: "assistant", content, reasoning, stats, error}.
let conversations = load(STORE, []);
let current = conversations.find((c) => c.id === localStorage.getItem(CURRENT)) || null;
let controller = null;   // aborts the answer being streamed
let modelId = null;

function load(key, fallback) {
  try { return JSON.parse(localStorage.getItem(key)) || fallback; } catch { return fallback; }
}

function save() {
  // An empty conversation is not kept: "New chat" twice leaves one.
  const kept = conversations.filter((c) => c.messages.length);
  localStorage.setItem(STORE, JSON.stringify(kept));
  localStorage.setItem(CURRENT, current ? current.id : "");
}

// -- settings ---------------------------------------------------------------------------------
const settings = load(SETTINGS, {});
for (const id of SETTING_IDS) {
  $(id).value = settings[id] ?? "";
  $(id).onchange = () => {
    settings[id] = $(id).value;
    localStorage.setItem(SETTINGS, JSON.stringify(settings));
  };
}
keyInput.value = localStorage.getItem("thrifty-key") || "";
keyInput.onchange = () => { localStorage.setItem("thrifty-key", keyInput.value); loadModel(); };

function number(id) {
  const text = $(id).value.trim();
  return text === "" ? undefined : Number(text);
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if (keyInput.value) h["Authorization"] = "Bearer " + keyInput.value;
  return h;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    modelId = body.data[0].id;
    $("model").textContent = modelId;
  } catch (e) {
    $("model").textContent = "error: " + e.message;
  }
}

// -- rendering --------------------------------------------------------------------------------
function markdown(text) {
  // marked turns Markdown into HTML; DOMPurify removes anything that could run or load.
  return DOMPurify.sanitize(marked.parse(text, { gfm: true, breaks: true }));
}

function renderList() {
  const list = $("conversations");
  list.replaceChildren();
  for (const c of conversations.filter((c) => c.messages.length || c === current)) {
    const li = document.createElement("li");
    if (c === current) li.className = "current";
    const open = document.createElement("button");
    open.className = "open";
    open.textContent = c.title || "New chat";
    open.onclick = () => { if (!controller) { current = c; save(); renderAll(); } };
    const del = document.createElement("button");
    del.className = "delete";
    del.title = "Delete";
    del.textContent = "×";
    del.onclick = () => {
      if (controller) return;
      conversations = conversations.filter((x) => x !== c);
      if (current === c) current = null;
      save();
      renderAll();
    };
    li.append(open, del);
    list.appendChild(li);
  }
}

function renderAll() {
  renderList();
  log.replaceChildren();
  if (!current) return;
  current.messages.forEach((m, i) => {
    if (m.role === "user") bubbleUser(m.content);
    else fillAssistant(bubbleAssistant(), m, i === current.messages.length - 1);
  });
  log.scrollTop = log.scrollHeight;
}

function bubbleUser(text) {
  const div = document.createElement("div");
  div.className = "msg user";
  div.textContent = text;
  log.appendChild(div);
}

function bubbleAssistant() {
  const div = document.createElement("div");
  div.className = "msg assistant";
  const details = document.createElement("details");
  details.className = "reasoning";
  details.innerHTML = "<summary>Reasoning</summary>";
  const thinking = document.createElement("div");
  details.appendChild(thinking);
  const answer = document.createElement("div");
  answer.className = "answer";
  const meta = document.createElement("div");
  meta.className = "meta";
  div.append(answer, meta);
  log.appendChild(div);
  return { div, details, thinking, answer, meta };
}

// Show message `m` in bubble `b`; the last answer gets a Regenerate button.
function fillAssistant(b, m, last) {
  if (m.reasoning) {
    if (!b.details.parentNode) b.div.insertBefore(b.details, b.answer);
    b.thinking.textContent = m.reasoning;
    b.details.open = !m.content;
  }
  b.answer.innerHTML = markdown(m.content + (m.stopped ? " [stopped]" : ""));
  b.div.querySelectorAll(".error").forEach((e) => e.remove());
  if (m.error) {
    const err = document.createElement("div");
    err.className = "error";
    err.textContent = "error: " + m.error;
    b.div.insertBefore(err, b.meta);
  }
  b.meta.replaceChildren();
  if (m.stats) {
    const s = document.createElement("span");
    s.className = "stats";
    s.textContent = m.stats;
    b.meta.appendChild(s);
  }
  if (m.content) b.meta.appendChild(button("Copy", "copy", (e) => copy(m.content, e.target)));
  if (last) b.meta.appendChild(button("Regenerate", "regenerate", regenerate));
}

function button(label, cls, onclick) {
  const btn = document.createElement("button");
  btn.type = "button";
  btn.className = cls;
  btn.textContent = label;
  btn.onclick = onclick;
  return btn;
}

async function copy(text, btn) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {  // plain http on another host: no async clipboard, the old way works
    const area = document.createElement("textarea");
    area.value = text;
    document.body.appendChild(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  btn.textContent = "Copied";
  setTimeout(() => { btn.textContent = "Copy"; }, 1500);
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
}

// -- asking -----------------------------------------------------------------------------------
function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  for (const m of current.messages) {
    // Reasoning is never fed back; an answer that has no text (only reasoning, or an error)
    // is left out, and its question stays.
    if (m.role === "user" || m.content) messages.push({ role: m.role, content: m.content });
  }
  const body = { model: modelId, messages, stream: true, stream_options: { include_usage: true } };
  const temperature = number("temperature"), maxTokens = number("max-tokens");
  const thinking = number("thinking");
  if (temperature !== undefined) body.temperature = temperature;
  if (maxTokens !== undefined) body.max_tokens = maxTokens;
  if (thinking !== undefined) body.max_thinking_tokens = thinking;
  return body;
}

async function answer() {
  const m = { role: "assistant", content: "", reasoning: "" };
  current.messages.push(m);
  renderList();
  log.querySelectorAll(".regenerate").forEach((e) => e.remove());  // only the last answer's
  const b = bubbleAssistant();
  controller = new AbortController();
  busy(true);
  let first = null, last = null, tokens = 0, usage = null, pending = false, live = true;
  const show = () => {  // at most once a frame: re-rendering Markdown costs
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => { pending = false; if (live) fillAssistant(b, m, false); });
  };
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify(requestBody()),
    });
    if (!r.ok) {
      const body = await r.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : r.statusText);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let i;
      while ((i = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, i);
        buffer = buffer.slice(i + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        for (const c of chunk.choices || []) {
          const d = c.delta || {};
          if (d.reasoning_content || d.content) {
            last = performance.now();
            first = first ?? last;
            tokens += 1;  // one chunk per token while streaming; usage corrects it at the end
          }
          if (d.reasoning_content) m.reasoning += d.reasoning_content;
          if (d.content) m.content += d.content;
        }
        show();
        log.scrollTop = log.scrollHeight;
      }
    }
  } catch (e) {
    if (e.name === "AbortError") m.stopped = true;
    else m.error = e.message;
  } finally {
    live = false;
    controller = null;
  }
  if (first !== null) {
    // The rate is decoding's: the tokens after the first over the time they took.
    const n = usage ? usage.completion_tokens : tokens;
    const seconds = (last - first) / 1000;
    m.stats = n === 1 ? "1 token" : `${n} tokens`;
    if (tokens > 1 && seconds > 0) m.stats += `, ${((tokens - 1) / seconds).toFixed(1)} tokens/s`;
  }
  save();
  fillAssistant(b, m, true);  // in place: the elements on the page stay the same
  busy(false);
}

function ask(text) {
  if (!current) {
    current = { id: String(Date.now()) + Math.random().toString(16).slice(2, 6), title: "",
                messages: [] };
    conversations.unshift(current);
  }
  if (!current.title) current.title = text.slice(0, 60);
  current.messages.push({ role: "user", content: text });
  save();
  bubbleUser(text);
  return answer();
}

function regenerate() {
  if (controller || !current) return;
  const last = current.messages[current.messages.length - 1];
  if (last && last.role === "assistant") current.messages.pop();
  renderAll();
  answer();
}

$("form").onsubmit = (e) => {
  e.preventDefault();
  const text = input.value.trim();
  if (!text || controller) return;
  input.value = "";
  ask(text);
};
input.onkeydown = (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("form").requestSubmit(); }
};
$("stop").onclick = () => controller && controller.abort();
$("reset").onclick = () => {
  if (controller) controller.abort();
  current = null;
  save();
  renderAll();
};
loadModel();
renderAll();
input.focus();

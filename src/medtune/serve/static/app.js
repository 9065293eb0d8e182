// medtune chat page: streams answers from /v1/chat/completions (OpenAI SSE) and shows the emergency banner.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "medtune.apiKey";
const state = { messages: [], model: null, controller: null };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = localStorage.getItem(KEY);
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function askKey() {
  return new Promise((resolve) => {
    const dialog = $("key-dialog");
    $("key-input").value = localStorage.getItem(KEY) || "";
    dialog.onclose = () => {
      if (dialog.returnValue === "ok") localStorage.setItem(KEY, $("key-input").value.trim());
      resolve(dialog.returnValue === "ok");
    };
    dialog.showModal();
  });
}

async function loadModel() {
  const r = await fetch("/v1/models", { headers: headers() });
  if (r.status === 401) {
    if (await askKey()) return loadModel();
    return;
  }
  if (r.ok) {
    const body = await r.json();
    state.model = body.data[0].id;
    $("model").textContent = "模型：" + state.model;
  }
}

function bubble(role, text) {
  const hint = document.querySelector(".hint");
  if (hint) hint.remove();
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("conversation").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function showEmergency(text) {
  $("emergency-text").textContent = text.replace(/^【紧急提示】/, "").trim();
  $("emergency").hidden = false;
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
}

// Reads `data: ...` events from a fetch body; calls onEvent with each parsed JSON payload.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}

async function send(question) {
  const department = $("department").value || null;
  state.messages.push({ role: "user", content: question });
  bubble("user", question);
  const answer = bubble("assistant", "");
  answer.classList.add("streaming");
  answer.dataset.chunks = "0";
  let text = "";
  state.controller = new AbortController();
  busy(true);
  try {
    const body = { messages: state.messages, stream: true };
    if (state.model) body.model = state.model;
    if (department) body.department = department;
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: state.controller.signal,
    });
    if (r.status === 401) {
      state.messages.pop();
      answer.remove();
      if (await askKey()) return send(question);
      return;
    }
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      throw new Error((err.error && err.error.message) || ("HTTP " + r.status));
    }
    await readEvents(r, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.emergency && $("emergency").hidden) showEmergency((chunk.choices[0].delta.content || "").split("\n\n")[0]);
      const delta = chunk.choices.length ? chunk.choices[0].delta.content : null;
      if (delta) {
        text += delta;
        answer.textContent = text;
        answer.dataset.chunks = String(Number(answer.dataset.chunks) + 1);
        answer.scrollIntoView({ block: "end" });
      }
    });
    answer.dataset.done = "true";
  } catch (e) {
    if (e.name === "AbortError") {
      text += "\n（已停止）";
      answer.textContent = text;
      answer.dataset.done = "stopped";
    } else {
      answer.classList.add("error");
      answer.textContent = "出错了：" + e.message;
      answer.dataset.done = "error";
    }
  } finally {
    answer.classList.remove("streaming");
    if (text) state.messages.push({ role: "assistant", content: text });
    else state.messages.pop();
    state.controller = null;
    busy(false);
  }
}

$("ask").addEventListener("submit", (e) => {
  e.preventDefault();
  const question = $("question").value.trim();
  if (!question || state.controller) return;
  $("question").value = "";
  send(question);
});
$("question").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    $("ask").requestSubmit();
  }
});
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("clear").addEventListener("click", () => {
  if (state.controller) state.controller.abort();
  state.messages = [];
  $("conversation").replaceChildren();
  $("emergency").hidden = true;
});
$("key-button").addEventListener("click", async () => { if (await askKey()) loadModel(); });
loadModel();

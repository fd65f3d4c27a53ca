// The demo page's logic: one resumable POST stream and one viewer of the same session.
// Query parameters: ?rate=<events/s> (sent as x-demo-rate to the demo upstream) and
// ?max_tokens=<n>. window.demo holds the state of both panels (the browser test reads it).

import { resumableFetch, subscribe } from "./client.js";

const params = new URLSearchParams(window.location.search);
const rate = params.get("rate");
const maxTokens = Number(params.get("max_tokens") ?? 40);

function panelState(name) {
  return { name, state: "idle", ids: [], text: "", reconnects: 0, end: null, error: null };
}

const demo = {
  session: null,
  drops: 0,
  writer: panelState("writer"),
  viewer: panelState("viewer"),
};
window.demo = demo;

const startButton = document.getElementById("start");
const dropButton = document.getElementById("drop");
let writerStream = null;

function render(panel) {
  const section = document.getElementById(panel.name);
  section.dataset.state = panel.state;
  let status = panel.state;
  if (panel.end) status += ` (${panel.end.state})`;
  if (panel.error) status += `: ${panel.error}`;
  section.querySelector(".status").textContent = status;
  section.querySelector(".meta").textContent =
    `session ${demo.session ?? "-"} · ${panel.ids.length} events · ` +
    `${panel.reconnects} reconnect${panel.reconnects === 1 ? "" : "s"}`;
  section.querySelector(".text").textContent = panel.text;
}

function addRow(panel, text, className) {
  const list = document.getElementById(panel.name).querySelector("ul.ids");
  const item = document.createElement("li");
  item.textContent = text;
  if (className) item.className = className;
  list.append(item);
  list.scrollTop = list.scrollHeight;
}

function contentOf(data) {
  if (data === "[DONE]") return "";
  try {
    return JSON.parse(data).choices?.[0]?.delta?.content ?? "";
  } catch {
    return "";
  }
}

function onEvent(panel, event) {
  panel.ids.push(event.id);
  panel.text += contentOf(event.data);
  addRow(panel, `${event.id}  ${event.data === "[DONE]" ? "[DONE]" : JSON.stringify(contentOf(event.data))}`);
  render(panel);
}

function onReconnect(panel) {
  return (info) => {
    panel.reconnects = info.attempt;
    addRow(panel, `↻ reconnect ${info.attempt}, Last-Event-ID: ${info.lastEventId}`, "reconnect");
    render(panel);
  };
}

async function runViewer(session) {
  const panel = demo.viewer;
  panel.state = "streaming";
  render(panel);
  const stream = subscribe("", session, { onReconnect: onReconnect(panel) });
  try {
    for await (const event of stream) onEvent(panel, event);
    panel.end = stream.end;
    panel.state = "done";
  } catch (error) {
    panel.error = `${error.name}: ${error.message}`;
    panel.state = "error";
  }
  render(panel);
}

async function runWriter(prompt) {
  const panel = demo.writer;
  panel.state = "streaming";
  render(panel);
  const headers = { "content-type": "application/json" };
  if (rate) headers["x-demo-rate"] = rate;
  const body = JSON.stringify({
    model: "demo-llm",
    messages: [{ role: "user", content: prompt }],
    max_tokens: maxTokens,
    stream: true,
  });
  const stream = resumableFetch("/v1/chat/completions", { method: "POST", headers, body }, {
    onReconnect: onReconnect(panel),
  });
  writerStream = stream;
  dropButton.disabled = false;
  let viewer = null;
  try {
    for await (const event of stream) {
      if (viewer === null && stream.session) {
        demo.session = stream.session;
        viewer = runViewer(stream.session);
      }
      onEvent(panel, event);
    }
    panel.state = "done";
  } catch (error) {
    panel.error = `${error.name}: ${error.message}`;
    panel.state = "error";
  } finally {
    dropButton.disabled = true;
    writerStream = null;
  }
  render(panel);
  await viewer;
  startButton.disabled = false;
}

document.getElementById("prompt-form").addEventListener("submit", (e) => {
  e.preventDefault();
  startButton.disabled = true;
  demo.session = null;
  demo.drops = 0;
  for (const name of ["writer", "viewer"]) {
    demo[name] = panelState(name);
    document.getElementById(name).querySelector("ul.ids").replaceChildren();
    render(demo[name]);
  }
  runWriter(document.getElementById("prompt").value);
});

dropButton.addEventListener("click", () => {
  if (writerStream === null) return;
  demo.drops += 1;
  writerStream.dropConnection();
});

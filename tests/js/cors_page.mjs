#!/usr/bin/env node
// A page on another origin uses the relay in headless Chromium (tests/test_cors.py runs it).
//
//   node cors_page.mjs <playwright-core index.mjs> <relay base URL> <granted page URL>
//                      <other page URL> [--chromium /usr/bin/chromium] [--timeout-ms N]
//
// From the granted origin: a fetch POST stream, read headers (x-relay-session, x-request-id,
// a rate-limit header), dropped after 3 events and resumed with Last-Event-ID (a preflighted
// request); an EventSource viewer on the session up to its relay.end; a WebSocket on it. From
// the other origin: the same calls, which the browser must refuse. Prints one JSON line
// {granted: {...}, other: {...}, consoleErrors: {...}}; exit 0 when the pages got that far
// (the Python test judges), 1 on a failure to drive them, 64 on bad usage.

const [playwrightPath, base, grantedUrl, otherUrl, ...rest] = process.argv.slice(2);
if (!playwrightPath || !base || !grantedUrl || !otherUrl) {
  process.stderr.write("usage: cors_page.mjs <playwright> <base> <granted page> <other page>\n");
  process.exit(64);
}
let chromiumPath = "/usr/bin/chromium";
let timeoutMs = 30000;
for (let i = 0; i < rest.length; i++) {
  if (rest[i] === "--chromium") chromiumPath = rest[++i];
  else if (rest[i] === "--timeout-ms") timeoutMs = Number(rest[++i]);
  else {
    process.stderr.write(`unexpected argument: ${rest[i]}\n`);
    process.exit(64);
  }
}
const { chromium } = await import(playwrightPath);

const BODY = JSON.stringify({
  model: "slow",
  stream: true,
  messages: [{ role: "user", content: "from another origin" }],
});

// Runs in the page. Every step records what it saw; errors are data, not exceptions.
async function exercise({ base, body, session, timeoutMs }) {
  const out = {};
  const ids = (text) =>
    text.split("\n").filter((l) => l.startsWith("id: ")).map((l) => l.slice(4));
  const withTimeout = (promise, label) =>
    Promise.race([
      promise,
      new Promise((resolve) => setTimeout(() => resolve({ timeout: label }), timeoutMs)),
    ]);
  const headers = { "content-type": "application/json" };
  try {
    const abort = new AbortController();
    const first = await fetch(`${base}/v1/chat/completions`, {
      method: "POST", headers, body, signal: abort.signal,
    });
    out.status = first.status;
    out.session = first.headers.get("x-relay-session");
    out.requestId = first.headers.get("x-request-id");
    out.rateLimit = first.headers.get("x-ratelimit-limit-requests");
    const reader = first.body.getReader();
    const decoder = new TextDecoder();
    let text = "";
    while (ids(text).length < 3 || !text.endsWith("\n\n")) {
      const { value, done } = await reader.read();
      if (done) break;
      text += decoder.decode(value, { stream: true });
    }
    abort.abort(); // the drop: the generation goes on without this client
    out.before = ids(text);
    const last = out.before[out.before.length - 1];
    const resumed = await fetch(`${base}/v1/chat/completions`, {
      method: "POST", headers: { ...headers, "last-event-id": last }, body,
    });
    out.resumeStatus = resumed.status;
    const tail = await resumed.text();
    out.after = ids(tail);
    out.resumeEndsDone = tail.includes("data: [DONE]");
  } catch (error) {
    out.fetchError = String(error);
  }
  const target = session ?? out.session;
  out.eventSource = await withTimeout(new Promise((resolve) => {
    const seen = { ids: [], errors: 0 };
    const source = new EventSource(`${base}/relay/v1/sessions/${target}/events`);
    source.onmessage = (event) => seen.ids.push(event.lastEventId);
    source.addEventListener("relay.end", (event) => {
      seen.end = JSON.parse(event.data);
      source.close();
      resolve(seen);
    });
    source.onerror = () => {
      seen.errors += 1;
      if (source.readyState === EventSource.CLOSED || seen.errors >= 3) {
        source.close();
        resolve(seen);
      }
    };
  }), "eventSource");
  out.webSocket = await withTimeout(new Promise((resolve) => {
    const seen = { types: [], error: false };
    const socket = new WebSocket(`${base.replace(/^http/, "ws")}/relay/v1/sessions/${target}/ws`);
    socket.onmessage = (message) => seen.types.push(JSON.parse(message.data).type);
    socket.onerror = () => { seen.error = true; };
    socket.onclose = (event) => { seen.code = event.code; resolve(seen); };
  }), "webSocket");
  try {
    const state = await fetch(`${base}/relay/v1/sessions/${target}`);
    out.stateStatus = state.status;
  } catch (error) {
    out.stateError = String(error);
  }
  return out;
}

const browser = await chromium.launch({
  executablePath: chromiumPath,
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run"],
  timeout: timeoutMs,
});
let exitCode = 0;
try {
  const result = { consoleErrors: {} };
  for (const [label, url] of [["granted", grantedUrl], ["other", otherUrl]]) {
    const page = await browser.newPage();
    page.setDefaultTimeout(timeoutMs);
    const errors = [];
    page.on("console", (m) => { if (m.type() === "error") errors.push(m.text().slice(0, 200)); });
    await page.goto(url);
    result[label] = await page.evaluate(exercise, {
      base, body: BODY, session: result.granted?.session ?? null, timeoutMs: timeoutMs / 3,
    });
    result.consoleErrors[label] = errors;
    await page.close();
  }
  process.stdout.write(JSON.stringify(result) + "\n");
} catch (error) {
  process.stderr.write(`${error.stack ?? error}\n`);
  exitCode = 1;
} finally {
  await browser.close();
}
process.exit(exitCode);

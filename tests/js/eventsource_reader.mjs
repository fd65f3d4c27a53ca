#!/usr/bin/env node
// Read a relay session with the npm `eventsource` package, as a browser would.
//
//   node eventsource_reader.mjs <url> [--timeout-ms N] [--retry-ms N]
//
// <url> is a /relay/v1/sessions/{id}/events URL. Every message goes to stdout as one JSON
// line {"id": lastEventId, "data": ..., "type": ...}; so does the final `relay.end` event,
// after which the script closes the EventSource and exits 0. Reconnects (the EventSource's
// own, with Last-Event-ID) are logged to stderr as JSON lines {"connect": ..., "lastEventId":
// ...}. Exit 1: the EventSource gave up (HTTP error, 204 before relay.end, bad content type);
// exit 2: no relay.end within --timeout-ms; exit 64: bad usage.
//
// --retry-ms N (default 50): the relay sends no `retry:` field, so the package would wait its
// default 3 s before each reconnect. A custom fetch prepends `retry: N` to each response body:
// exactly what a server sending `retry: N` would do. --retry-ms 0 leaves the stream untouched.

import { EventSource } from "eventsource";

function usage(message) {
  process.stderr.write(`${message}\nusage: eventsource_reader.mjs <url> [--timeout-ms N] [--retry-ms N]\n`);
  process.exit(64);
}

function parseArgs(argv) {
  const options = { url: undefined, timeoutMs: 20000, retryMs: 50 };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === "--timeout-ms" || arg === "--retry-ms") {
      const value = Number(argv[++i]);
      if (!Number.isInteger(value) || value < 0) usage(`${arg} needs a non-negative integer`);
      options[arg === "--timeout-ms" ? "timeoutMs" : "retryMs"] = value;
    } else if (options.url === undefined && !arg.startsWith("--")) {
      options.url = arg;
    } else {
      usage(`unexpected argument: ${arg}`);
    }
  }
  if (options.url === undefined) usage("missing <url>");
  return options;
}

const options = parseArgs(process.argv.slice(2));
const retryHint = new TextEncoder().encode(`retry: ${options.retryMs}\n\n`);

function log(record) {
  process.stderr.write(`${JSON.stringify(record)}\n`);
}

async function fetchWithRetryHint(url, init) {
  log({ connect: String(url), lastEventId: init?.headers?.["Last-Event-ID"] ?? null });
  const response = await fetch(url, init);
  if (options.retryMs === 0 || response.status !== 200 || response.body === null) {
    return response;
  }
  // A stream error (the cut) propagates through pipeThrough to the EventSource's reader.
  const body = response.body.pipeThrough(
    new TransformStream({
      start(controller) {
        controller.enqueue(retryHint);
      },
    }),
  );
  return new Response(body, {
    status: response.status,
    statusText: response.statusText,
    headers: response.headers,
  });
}

const source = new EventSource(options.url, { fetch: fetchWithRetryHint });
let finished = false;

function finish(code, message) {
  if (finished) return;
  finished = true;
  clearTimeout(timer);
  source.close();
  if (message) process.stderr.write(`eventsource_reader: ${message}\n`);
  process.exitCode = code;
  // Exit once stdout is flushed: a keep-alive socket must not hold the process open.
  process.stdout.write("", () => process.exit(code));
}

const timer = setTimeout(
  () => finish(2, `no relay.end within ${options.timeoutMs} ms`),
  options.timeoutMs,
);

function print(event) {
  process.stdout.write(
    `${JSON.stringify({ id: event.lastEventId, data: event.data, type: event.type })}\n`,
  );
}

source.addEventListener("message", print);
source.addEventListener("relay.end", (event) => {
  print(event);
  finish(0);
});
source.addEventListener("error", (event) => {
  const detail = `${event.message ?? "error"}${event.code ? ` (code ${event.code})` : ""}`;
  if (source.readyState === source.CLOSED) {
    finish(1, `the EventSource gave up: ${detail}`);
  } else {
    log({ reconnecting: detail });
  }
});

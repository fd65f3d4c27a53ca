#!/usr/bin/env node
// Drive the JS client against a real stack (tests/test_client_js.py runs it, often through
// the chaos proxy). Prints one JSON line to stdout and exits 0, or prints
// {"error": <class name>, "status", "code", "message"} and exits 1.
//
//   node stack.mjs post <base_url> [--rate R] [--max-tokens N] [--prompt P]
//                      [--last-event-id ID] [--max-reconnects N]
//   node stack.mjs subscribe <base_url> <session> [--after ID]
//
// post: resumableFetch POST <base_url>/v1/chat/completions (stream: true);
// subscribe: subscribe(<base_url>, <session>). Output: {session, reconnects, lastEventIds
// (sent on each reconnect), events: [{id, event, data}], text (the delta contents), end}.

import { RelayClientError, resumableFetch, subscribe } from "../src/index.js";

function usage(message) {
  process.stderr.write(`${message}\nusage: stack.mjs post|subscribe <base_url> ...\n`);
  process.exit(64);
}

const [mode, baseUrl, ...rest] = process.argv.slice(2);
if (!["post", "subscribe"].includes(mode) || !baseUrl) usage("bad arguments");
const options = {
  rate: null,
  maxTokens: 60,
  prompt: "a js client through chaos",
  after: null,
  lastEventId: null,
  maxReconnects: 60,
};
const positional = [];
for (let i = 0; i < rest.length; i++) {
  const arg = rest[i];
  if (arg === "--rate") options.rate = rest[++i];
  else if (arg === "--max-tokens") options.maxTokens = Number(rest[++i]);
  else if (arg === "--prompt") options.prompt = rest[++i];
  else if (arg === "--after") options.after = rest[++i];
  else if (arg === "--last-event-id") options.lastEventId = rest[++i];
  else if (arg === "--max-reconnects") options.maxReconnects = Number(rest[++i]);
  else if (!arg.startsWith("--")) positional.push(arg);
  else usage(`unexpected argument: ${arg}`);
}

// Many cuts per stream in the chaos tests: a generous budget, short backoff.
const policy = {
  maxReconnects: options.maxReconnects,
  baseMs: 5,
  capMs: 50,
  onReconnect: (r) => lastEventIds.push(r.lastEventId),
};
const lastEventIds = [];

function textOf(events) {
  let text = "";
  for (const e of events) {
    if (e.event !== "message" || e.data === "[DONE]") continue;
    text += JSON.parse(e.data).choices?.[0]?.delta?.content ?? "";
  }
  return text;
}

async function main() {
  let stream;
  if (mode === "post") {
    const headers = { "content-type": "application/json" };
    if (options.rate !== null) headers["x-demo-rate"] = options.rate;
    if (options.lastEventId !== null) headers["Last-Event-ID"] = options.lastEventId;
    const body = JSON.stringify({
      model: "demo-llm",
      messages: [{ role: "user", content: options.prompt }],
      max_tokens: options.maxTokens,
      stream: true,
    });
    stream = resumableFetch(`${baseUrl}/v1/chat/completions`, { method: "POST", headers, body }, policy);
  } else {
    if (positional.length !== 1) usage("subscribe needs <session>");
    stream = subscribe(baseUrl, positional[0], { ...policy, after: options.after ?? undefined });
  }
  const events = [];
  for await (const e of stream) events.push({ id: e.id, event: e.event, data: e.data });
  return {
    session: stream.session,
    reconnects: stream.reconnects,
    lastEventIds,
    events,
    text: textOf(events),
    end: stream.end,
    done: stream.done,
  };
}

try {
  const result = await main();
  process.stdout.write(`${JSON.stringify(result)}\n`, () => process.exit(0));
} catch (error) {
  const record = {
    error: error?.name ?? "Error",
    typed: error instanceof RelayClientError,
    status: error?.status ?? null,
    code: error?.code ?? null,
    message: String(error?.message ?? error),
    lastEventIds,
  };
  process.stdout.write(`${JSON.stringify(record)}\n`, () => process.exit(1));
}

// Unit tests of the parser, the resume state machine and the driver, with a fake fetch.
// Run: node --test clients/js/test/

import assert from "node:assert/strict";
import { test } from "node:test";

import {
  backoffDelay,
  EventDecoder,
  Forbidden,
  RelayClientError,
  ResumeState,
  RetryBudgetExhausted,
  resumableFetch,
  SessionExpired,
  SessionNotFound,
  subscribe,
} from "../src/index.js";

const S = "AAAAAAAAAAAAAAAAAAAAAA"; // a 22-character session id
const encoder = new TextEncoder();

function event(seq, text) {
  return `id: ${S}:${seq}\ndata: ${JSON.stringify({ t: text })}\n\n`;
}

const WHOLE = [event(1, "a"), event(2, "b"), event(3, "c"), `id: ${S}:4\ndata: [DONE]\n\n`];

/** A fake fetch answering from `script`, one entry per call:
 * {status, headers, chunks: [string | Uint8Array], cut: bool} or {throws: Error}. */
function fakeFetch(script) {
  const calls = [];
  const fetch = async (url, init) => {
    const headers = new Headers(init.headers);
    calls.push({ url: String(url), method: init.method, body: init.body, headers });
    const step = script.shift();
    if (step === undefined) throw new Error("fake fetch: no more responses scripted");
    if (step.throws) throw step.throws;
    const chunks = (step.chunks ?? []).map((c) => (typeof c === "string" ? encoder.encode(c) : c));
    const body = new ReadableStream({
      start(controller) {
        init.signal?.addEventListener("abort", () => controller.error(init.signal.reason));
      },
      pull(controller) {
        if (chunks.length) controller.enqueue(chunks.shift());
        else if (step.cut) controller.error(new TypeError("terminated"));
        else if (!step.hang) controller.close();
      },
    });
    const status = step.status ?? 200;
    const responseHeaders = { "content-type": "text/event-stream", ...(step.headers ?? {}) };
    if (step.session !== null && status === 200) {
      responseHeaders["x-relay-session"] = step.session ?? S;
    }
    if (status === 204) return new Response(null, { status });
    return new Response(step.text ?? body, { status, headers: responseHeaders });
  };
  return { fetch, calls };
}

const noSleep = { sleep: async () => {}, random: () => 0.5 };

async function collect(stream) {
  const out = [];
  for await (const e of stream) out.push(e);
  return out;
}

// ---- sans-IO core

test("ResumeState splits on every blank-line form and keeps a partial event", () => {
  const state = new ResumeState(S);
  assert.equal(state.lastEventId, `${S}:0`);
  const text = `id: ${S}:1\ndata: a\n\nid: ${S}:2\r\ndata: b\r\n\r\nid: ${S}:3\rdata: c\r\rid: ${S}:4\ndata: d`;
  const blocks = state.feed(text);
  assert.deepEqual(blocks, [
    `id: ${S}:1\ndata: a\n\n`,
    `id: ${S}:2\r\ndata: b\r\n\r\n`,
    `id: ${S}:3\rdata: c\r\r`,
  ]);
  assert.equal(state.lastEventId, `${S}:3`);
  assert.equal(state.reconnect(), `${S}:3`); // the partial event 4 is dropped
  const replay = `id: ${S}:4\ndata: d\n\n`; // the resume replays it whole
  assert.deepEqual(state.feed(replay), [replay]);
});

test("ResumeState holds a trailing CR: it may be the first half of a CRLF", () => {
  const state = new ResumeState(S);
  assert.deepEqual(state.feed("data: a\r\n\r"), []);
  assert.deepEqual(state.feed("\n"), ["data: a\r\n\r\n"]);
  assert.deepEqual(state.feed("data: b\n\r"), []);
  assert.deepEqual(state.finish(), { blocks: ["data: b\n\r"], tail: "" });
});

test("ResumeState feeds byte by byte as whole", () => {
  const whole = WHOLE.join("");
  const state = new ResumeState(S);
  const blocks = [];
  for (const ch of whole) blocks.push(...state.feed(ch));
  assert.deepEqual(blocks, WHOLE);
  assert.equal(state.lastEventId, `${S}:4`);
  assert.equal(state.blocksSeen, 4);
});

test("ResumeState follows retry: and ignores empty or NUL ids", () => {
  const state = new ResumeState(null);
  assert.equal(state.lastEventId, null);
  assert.throws(() => state.reconnect(), RelayClientError);
  state.feed(`retry: 250\n\nid: x:1\ndata: a\n\nid:\ndata: b\n\nid: a\0b\ndata: c\n\nretry: 1x\n\n`);
  assert.equal(state.retryMs, 250);
  assert.equal(state.lastEventId, "x:1");
});

test("EventDecoder dispatches as an EventSource does", () => {
  const decoder = new EventDecoder();
  assert.equal(decoder.decode(": comment\n\n"), null);
  assert.equal(decoder.decode("retry: 5\n\n"), null);
  assert.deepEqual(decoder.decode("id: s:1\nevent: x\ndata: a\ndata:b\ndata\n\n"), {
    id: "s:1",
    event: "x",
    data: "a\nb\n",
    retry: null,
  });
  assert.deepEqual(decoder.decode("data: c\n\n"), { id: "s:1", event: "message", data: "c", retry: null });
  assert.equal(decoder.decode(`id: s:2\n\n`), null);
  assert.equal(decoder.decode(`data: d\n\n`).id, "s:2"); // the id persists
});

test("backoff is full jitter, capped, with retry: as the minimum", () => {
  const policy = { maxReconnects: 8, baseMs: 100, capMs: 5000 };
  assert.equal(backoffDelay(0, null, policy, () => 0.999999) < 100, true);
  assert.equal(backoffDelay(3, null, policy, () => 0.5), 400);
  assert.equal(backoffDelay(30, null, policy, () => 0.5), 2500);
  assert.equal(backoffDelay(0, null, policy, () => 0), 0);
  assert.equal(backoffDelay(0, 700, policy, () => 0), 700);
  assert.equal(backoffDelay(9, 700, policy, () => 0.9), 4500);
});

// ---- the driver

test("a cut mid-event re-sends the same request with the last whole event's id", async () => {
  const whole = WHOLE.join("");
  const cutAt = whole.indexOf("data", whole.indexOf(`${S}:2`)) + 3; // inside event 2
  const { fetch, calls } = fakeFetch([
    { chunks: [whole.slice(0, cutAt)], cut: true },
    { chunks: WHOLE.slice(1) },
  ]);
  const body = JSON.stringify({ stream: true });
  const init = { method: "POST", body, headers: { "content-type": "application/json" } };
  const stream = resumableFetch("http://relay/v1/chat/completions", init, { fetch, ...noSleep });
  const events = await collect(stream);
  assert.deepEqual(
    events.map((e) => e.id),
    [1, 2, 3, 4].map((n) => `${S}:${n}`),
  );
  assert.equal(events.at(-1).data, "[DONE]");
  assert.equal(calls.length, 2);
  assert.equal(calls[0].headers.get("last-event-id"), null);
  assert.equal(calls[1].headers.get("last-event-id"), `${S}:1`);
  assert.equal(calls[1].method, "POST");
  assert.equal(calls[1].body, body);
  assert.equal(calls[1].headers.get("content-type"), "application/json");
  assert.equal(stream.session, S);
  assert.equal(stream.reconnects, 1);
  assert.equal(stream.done, true);
});

test("cuts at every offset, with any chunking, yield every event exactly once", async () => {
  const whole = WHOLE.join("");
  for (let cut = 0; cut < whole.length; cut++) {
    // the replay after a cut starts after the last whole event before it
    const before = whole.slice(0, cut);
    const wholeEvents = WHOLE.filter((_, i) => WHOLE.slice(0, i + 1).join("").length <= cut).length;
    const rest = WHOLE.slice(wholeEvents).join("");
    const { fetch, calls } = fakeFetch([
      { chunks: [...before], cut: true }, // one char per chunk
      { chunks: [rest.slice(0, 7), rest.slice(7)] },
    ]);
    const events = await collect(resumableFetch("http://r/x", { method: "POST", body: "{}" }, { fetch, ...noSleep }));
    assert.deepEqual(
      events.map((e) => e.id),
      [1, 2, 3, 4].map((n) => `${S}:${n}`),
      `cut at ${cut}`,
    );
    assert.equal(calls[1].headers.get("last-event-id"), `${S}:${wholeEvents}`);
  }
});

test("a multibyte character split across chunks decodes whole; a split one at a cut is dropped", async () => {
  const text = event(1, "héllo → ✓");
  const bytes = encoder.encode(text + event(2, "b"));
  const at = encoder.encode(text).length + 20; // inside event 2
  const split = encoder.encode(text).indexOf(0xe2) + 1; // inside the arrow
  const { fetch } = fakeFetch([
    { chunks: [bytes.slice(0, split), bytes.slice(split, at)], cut: true },
    { chunks: [event(2, "b")] },
  ]);
  const events = await collect(resumableFetch("http://r/x", {}, { fetch, ...noSleep }));
  assert.deepEqual(
    events.map((e) => JSON.parse(e.data).t),
    ["héllo → ✓", "b"],
  );
});

test("retryable answers are retried within the budget; retry: is the minimum delay", async () => {
  const delays = [];
  const { fetch, calls } = fakeFetch([
    { chunks: [`retry: 300\n\n`, WHOLE[0]], cut: true },
    { status: 503, text: "busy" },
    { throws: new TypeError("fetch failed") },
    { status: 429, text: JSON.stringify({ error: { message: "slow", type: "x", code: "limit_exceeded" } }) },
    { chunks: WHOLE.slice(1) },
  ]);
  const events = await collect(
    resumableFetch("http://r/x", {}, { fetch, random: () => 0, sleep: async (ms) => delays.push(ms) }),
  );
  assert.equal(events.length, 4);
  assert.deepEqual(delays, [300, 300, 300, 300]);
  assert.equal(calls.length, 5);
  assert.ok(calls.slice(1).every((c) => c.headers.get("last-event-id") === `${S}:1`));
});

test("the retry budget ends the stream with RetryBudgetExhausted and the last cause", async () => {
  const failure = new TypeError("fetch failed");
  const { fetch } = fakeFetch([
    { chunks: [WHOLE[0]], cut: true },
    { throws: failure },
    { throws: failure },
    { throws: failure },
  ]);
  const stream = resumableFetch("http://r/x", {}, { fetch, ...noSleep, maxReconnects: 3 });
  const seen = [];
  await assert.rejects(
    (async () => {
      for await (const e of stream) seen.push(e.id);
    })(),
    (error) => {
      assert.ok(error instanceof RetryBudgetExhausted);
      assert.ok(error instanceof RelayClientError);
      assert.equal(error.reconnects, 3);
      assert.equal(error.session, S);
      assert.equal(error.cause, failure);
      return true;
    },
  );
  assert.deepEqual(seen, [`${S}:1`]);
});

for (const [status, Cls, code] of [
  [404, SessionNotFound, "session_not_found"],
  [410, SessionExpired, "session_gone"],
  [403, Forbidden, "forbidden"],
  [401, Forbidden, "unauthorized"],
  [400, RelayClientError, "malformed_event_id"],
]) {
  test(`a ${status} on resume throws ${Cls.name} with the relay's code`, async () => {
    const text = JSON.stringify({ error: { message: "no", type: "t", code } });
    const { fetch } = fakeFetch([{ chunks: [WHOLE[0]], cut: true }, { status, text }]);
    await assert.rejects(collect(resumableFetch("http://r/x", {}, { fetch, ...noSleep })), (error) => {
      assert.equal(error.constructor, Cls);
      assert.equal(error.name, Cls.name);
      assert.equal(error.status, status);
      assert.equal(error.code, code);
      assert.equal(error.session, S);
      assert.match(error.message, /HTTP \d+: no/);
      return true;
    });
  });
}

test("a failed first request throws the typed error, without reconnecting", async () => {
  const text = JSON.stringify({ error: { message: "unknown", type: "t", code: "session_not_found" } });
  const { fetch, calls } = fakeFetch([{ status: 404, text }]);
  await assert.rejects(collect(subscribe("http://r", S, { fetch, ...noSleep })), SessionNotFound);
  assert.equal(calls.length, 1);
  assert.equal(calls[0].url, `http://r/relay/v1/sessions/${S}/events`);
});

test("a resume answered by another session (relay down, failed open) is never spliced in", async () => {
  const { fetch } = fakeFetch([
    { chunks: [WHOLE[0]], cut: true },
    { chunks: [WHOLE[0]], session: "BBBBBBBBBBBBBBBBBBBBBB" },
  ]);
  await assert.rejects(collect(resumableFetch("http://r/x", {}, { fetch, ...noSleep })), (error) => {
    assert.equal(error.constructor, RelayClientError);
    assert.match(error.message, /not answered from the session's log/);
    return true;
  });
});

test("a partial event at a clean end is dropped, not yielded", async () => {
  const { fetch } = fakeFetch([{ chunks: [WHOLE[0], `id: ${S}:2\ndata: par`] }]);
  const events = await collect(resumableFetch("http://r/x", {}, { fetch, ...noSleep }));
  assert.deepEqual(
    events.map((e) => e.id),
    [`${S}:1`],
  );
});

test("dropConnection aborts the connection and the stream resumes", async () => {
  const { fetch, calls } = fakeFetch([{ chunks: [WHOLE[0]], hang: true }, { chunks: WHOLE.slice(1) }]);
  const reconnects = [];
  const stream = resumableFetch("http://r/x", {}, { fetch, ...noSleep, onReconnect: (r) => reconnects.push(r) });
  const ids = [];
  for await (const e of stream) {
    ids.push(e.id);
    if (ids.length === 1) stream.dropConnection();
  }
  assert.deepEqual(
    ids,
    [1, 2, 3, 4].map((n) => `${S}:${n}`),
  );
  assert.equal(calls.length, 2);
  assert.equal(reconnects.length, 1);
  assert.equal(reconnects[0].lastEventId, `${S}:1`);
  assert.equal(reconnects[0].cause.name, "AbortError");
});

test("the caller's abort signal ends the stream without a reconnect", async () => {
  const { fetch, calls } = fakeFetch([{ chunks: [WHOLE[0]], hang: true }]);
  const controller = new AbortController();
  const stream = resumableFetch("http://r/x", { signal: controller.signal }, { fetch, ...noSleep });
  const reason = new Error("user stop");
  await assert.rejects(
    (async () => {
      for await (const _ of stream) controller.abort(reason);
    })(),
    (error) => error === reason,
  );
  assert.equal(calls.length, 1);
});

test("breaking out of the loop releases the connection", async () => {
  let aborted = false;
  const { fetch } = fakeFetch([{ chunks: [WHOLE[0]], hang: true }]);
  const spy = async (url, init) => {
    init.signal.addEventListener("abort", () => {
      aborted = true;
    });
    return fetch(url, init);
  };
  for await (const _ of resumableFetch("http://r/x", {}, { fetch: spy, ...noSleep })) break;
  assert.equal(aborted, true);
});

test("a ReadableStream body is refused: it could not be sent again", () => {
  assert.throws(() => resumableFetch("http://r/x", { method: "POST", body: new ReadableStream() }), TypeError);
});

// ---- subscribe

const END = (seq, state = "done") =>
  `id: ${S}:${seq}\nevent: relay.end\ndata: ${JSON.stringify({ state, reason: "", last_seq: seq - 1 })}\n\n`;

test("subscribe ends at relay.end, exposes it and does not yield it", async () => {
  const { fetch, calls } = fakeFetch([{ chunks: [...WHOLE, END(5)], hang: true }]);
  const stream = subscribe("http://r/", S, { fetch, ...noSleep, after: `${S}:0` });
  const events = await collect(stream);
  assert.equal(events.length, 4);
  assert.deepEqual(stream.end, { state: "done", reason: "", last_seq: 4 });
  assert.equal(calls[0].url, `http://r/relay/v1/sessions/${S}/events?after=${encodeURIComponent(`${S}:0`)}`);
});

test("subscribe cut inside relay.end reconnects and still learns the end", async () => {
  const end = END(5, "cancelled");
  const { fetch, calls } = fakeFetch([
    { chunks: [...WHOLE, end.slice(0, 30)], cut: true },
    { chunks: [end] },
  ]);
  const stream = subscribe("http://r", S, { fetch, ...noSleep });
  assert.equal((await collect(stream)).length, 4);
  assert.equal(stream.end.state, "cancelled");
  assert.equal(calls[1].headers.get("last-event-id"), `${S}:4`);
});

test("subscribe treats a clean end without relay.end as a break", async () => {
  const { fetch, calls } = fakeFetch([{ chunks: WHOLE.slice(0, 2) }, { chunks: [...WHOLE.slice(2), END(5)] }]);
  const stream = subscribe("http://r", S, { fetch, ...noSleep });
  assert.equal((await collect(stream)).length, 4);
  assert.equal(calls.length, 2);
  assert.equal(stream.end.state, "done");
});

test("subscribe past the end (204) asks the session for its end state", async () => {
  const info = JSON.stringify({ session: S, state: "done", reason: "", last_seq: 4, readers: 0 });
  const { fetch, calls } = fakeFetch([{ status: 204 }, { text: info, headers: { "content-type": "application/json" } }]);
  const stream = subscribe("http://r", S, { fetch, ...noSleep, after: `${S}:5` });
  assert.deepEqual(await collect(stream), []);
  assert.deepEqual(stream.end, { state: "done", reason: "", last_seq: 4 });
  assert.equal(calls[1].url, `http://r/relay/v1/sessions/${S}`);
});

// stream-relay-client: resume stream-relay event streams across dropped connections.
//
// No dependencies: only fetch, ReadableStream, TextDecoder and AbortController, so the same
// file runs in Node >= 20 and in browsers. Mirrors the Python SDK (clients/python): the same
// sans-IO resume state machine, backoff policy, retryable statuses and error names.

export const SESSION_HEADER = "x-relay-session";
export const LAST_EVENT_ID_HEADER = "Last-Event-ID";
/** Answers to a reconnect that count against the budget and are tried again. */
export const RETRYABLE_STATUSES = new Set([429, 502, 503, 504]);

// ---------------------------------------------------------------------------------------
// Errors

/** Everything the client throws on its own. `status` and `code` come from the relay's typed
 * JSON error (`{"error": {"message", "type", "code"}}`) when there was one. */
export class RelayClientError extends Error {
  constructor(message, { status = null, code = null, session = null, cause } = {}) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = new.target.name;
    this.status = status;
    this.code = code;
    this.session = session;
  }
}

/** 410: the session expired or was evicted; its events are gone. */
export class SessionExpired extends RelayClientError {}

/** 404: the relay does not know the session. */
export class SessionNotFound extends RelayClientError {}

/** 401 or 403: the (re)connect was refused. */
export class Forbidden extends RelayClientError {}

/** Every reconnect allowed for this stream failed; `cause` is the last failure. */
export class RetryBudgetExhausted extends RelayClientError {
  constructor(message, { reconnects, session = null, cause } = {}) {
    super(message, { session, cause });
    this.reconnects = reconnects;
  }
}

const ERROR_BY_STATUS = new Map([
  [401, Forbidden],
  [403, Forbidden],
  [404, SessionNotFound],
  [410, SessionExpired],
]);

/** The typed error for a failed (re)connect, from its status and (JSON) body text. */
export function errorForStatus(status, bodyText, session = null) {
  let message = `HTTP ${status}`;
  let code = null;
  try {
    const error = JSON.parse(bodyText).error;
    if (error && typeof error.message === "string" && error.code !== undefined) {
      message = `HTTP ${status}: ${error.message}`;
      code = String(error.code);
    } else {
      throw new TypeError("not a relay error body");
    }
  } catch {
    if (bodyText) message = `HTTP ${status}: ${bodyText.slice(0, 200)}`;
  }
  const Cls = ERROR_BY_STATUS.get(status) ?? RelayClientError;
  return new Cls(message, { status, code, session });
}

async function errorForResponse(response, session) {
  let text = "";
  try {
    text = await response.text();
  } catch {
    // the body broke too: the status says enough
  }
  return errorForStatus(response.status, text, session);
}

// ---------------------------------------------------------------------------------------
// Sans-IO core: framing, the resume state machine, SSE parsing, backoff

// A blank line: two line terminators in a row. CRLF is one terminator, so a CR is one only
// when no LF follows it.
const BLANK_LINE = /(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)/g;
const LINE_BREAK = /\r\n|\r|\n/;
const DIGITS = /^[0-9]+$/;

function fields(block) {
  const out = [];
  for (const line of block.split(LINE_BREAK)) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    if (colon < 0) {
      out.push([line, ""]);
    } else {
      const value = line.slice(colon + 1);
      out.push([line.slice(0, colon), value.startsWith(" ") ? value.slice(1) : value]);
    }
  }
  return out;
}

/**
 * Fed the text of an event stream, connection after connection; tells what is safe to emit
 * (whole events only) and the id to resume from.
 *
 * `feed` returns the complete blocks (an event and its terminating blank line, verbatim) and
 * keeps a partial trailing event. `reconnect` drops that partial event, since the resume
 * replays it whole, and returns the `Last-Event-ID` to send. `finish`, at a clean end of the
 * stream, returns the remaining whole blocks and any partial tail.
 */
export class ResumeState {
  constructor(session, lastEventId = null) {
    this.session = session ?? null;
    this.lastEventId = lastEventId || (this.session ? `${this.session}:0` : null);
    this.retryMs = null;
    this.blocksSeen = 0;
    this._buffer = "";
    this._scanFrom = 0;
  }

  feed(text) {
    this._buffer += text;
    return this._split(false);
  }

  finish() {
    const blocks = this._split(true);
    const tail = this._buffer;
    this._buffer = "";
    this._scanFrom = 0;
    return { blocks, tail };
  }

  /** Drop the partial event of the broken connection; the id to resume after. */
  reconnect() {
    if (this.lastEventId === null) {
      throw new RelayClientError("no session and no event id: this stream cannot be resumed");
    }
    this._buffer = "";
    this._scanFrom = 0;
    return this.lastEventId;
  }

  _split(final) {
    const blocks = [];
    const buffer = this._buffer;
    let start = 0;
    BLANK_LINE.lastIndex = this._scanFrom;
    for (let match; (match = BLANK_LINE.exec(buffer)) !== null; ) {
      const end = match.index + match[0].length;
      if (end === buffer.length && buffer.endsWith("\r") && !final) {
        break; // a CR at the very end may be the first half of a CRLF
      }
      blocks.push(buffer.slice(start, end));
      start = end;
    }
    this._buffer = buffer.slice(start);
    this._scanFrom = Math.max(0, this._buffer.length - 3); // a blank line is at most 4 chars
    for (const block of blocks) this._observe(block);
    return blocks;
  }

  _observe(block) {
    this.blocksSeen += 1;
    for (const [name, value] of fields(block)) {
      if (name === "id" && value && !value.includes("\0")) {
        this.lastEventId = value;
      } else if (name === "retry" && DIGITS.test(value)) {
        this.retryMs = Number(value);
      }
    }
  }
}

/** Whole blocks in, events out, as an EventSource dispatches them (no data: no event). The
 * id persists from event to event, as an EventSource's `lastEventId` does. */
export class EventDecoder {
  constructor() {
    this.lastId = "";
  }

  decode(block) {
    let event = "";
    let retry = null;
    const data = [];
    for (const [name, value] of fields(block)) {
      if (name === "id" && !value.includes("\0")) this.lastId = value;
      else if (name === "event") event = value;
      else if (name === "data") data.push(value);
      else if (name === "retry" && DIGITS.test(value)) retry = Number(value);
    }
    if (data.length === 0) return null;
    return { id: this.lastId, event: event || "message", data: data.join("\n"), retry };
  }
}

/** Reconnects per stream, and exponential backoff with full jitter between them. */
export const DEFAULT_POLICY = Object.freeze({ maxReconnects: 8, baseMs: 100, capMs: 5000 });

/** Milliseconds to wait before reconnect number `attempt` (0-based):
 * `uniform(0, min(cap, base * 2**attempt))`; an SSE `retry:` (ms) is the minimum. */
export function backoffDelay(attempt, retryMs, policy = DEFAULT_POLICY, random = Math.random) {
  const ceiling = Math.min(policy.capMs, policy.baseMs * 2 ** Math.min(attempt, 62));
  const delay = random() * ceiling;
  return retryMs === null || retryMs === undefined ? delay : Math.max(delay, retryMs);
}

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(signal.reason);
      return;
    }
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal.reason);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

// ---------------------------------------------------------------------------------------
// The driver

class DroppedConnection extends Error {
  constructor() {
    super("connection dropped by dropConnection()");
    this.name = "AbortError";
  }
}

/**
 * One logical event stream over as many connections as it takes. Iterate it once with
 * `for await`; its fields follow the stream: `session`, `lastEventId`, `reconnects`, and for
 * `subscribe` the end state `end` (`{state, reason, last_seq}`).
 */
export class RelayStream {
  constructor(url, init, options, kind) {
    const body = init?.body;
    if (body !== undefined && body !== null && typeof body.getReader === "function") {
      throw new TypeError("a ReadableStream body cannot be sent again: pass a string or bytes");
    }
    this.url = url;
    this.init = { ...init };
    this.kind = kind;
    this.policy = {
      maxReconnects: options?.maxReconnects ?? DEFAULT_POLICY.maxReconnects,
      baseMs: options?.baseMs ?? DEFAULT_POLICY.baseMs,
      capMs: options?.capMs ?? DEFAULT_POLICY.capMs,
    };
    this._fetch = options?.fetch ?? ((...args) => globalThis.fetch(...args));
    this._random = options?.random ?? Math.random;
    this._sleep = options?.sleep ?? sleep;
    this._onReconnect = options?.onReconnect ?? null;
    this._signal = init?.signal ?? null;
    this._baseUrl = options?.baseUrl ?? null;
    this.session = null;
    this.lastEventId = new Headers(init?.headers).get(LAST_EVENT_ID_HEADER);
    this.reconnects = 0;
    this.response = null;
    this.end = null;
    this.done = false;
    this._connection = null;
    this._iterated = false;
  }

  /** Abort the current connection (not the stream): the client resumes, as after a network
   * failure. Does nothing between connections. */
  dropConnection() {
    this._connection?.abort(new DroppedConnection());
  }

  [Symbol.asyncIterator]() {
    if (this._iterated) throw new TypeError("a RelayStream can be iterated only once");
    this._iterated = true;
    return this._events();
  }

  async _send(lastEventId) {
    const headers = new Headers(this.init.headers);
    if (!headers.has("accept")) headers.set("accept", "text/event-stream");
    if (lastEventId) headers.set(LAST_EVENT_ID_HEADER, lastEventId);
    const controller = new AbortController();
    const signal = this._signal;
    if (signal) {
      if (signal.aborted) throw signal.reason;
      signal.addEventListener("abort", () => controller.abort(signal.reason), { once: true });
    }
    this._connection = controller;
    return this._fetch(this.url, { ...this.init, headers, signal: controller.signal });
  }

  _userAborted() {
    return this._signal?.aborted === true;
  }

  _nextDelay(state, cause) {
    if (state.lastEventId === null) throw cause; // no session and no id: nothing to resume
    if (this.reconnects >= this.policy.maxReconnects) {
      throw new RetryBudgetExhausted(
        `stream of session ${this.session} broke; ${this.reconnects} reconnects failed`,
        { reconnects: this.reconnects, session: this.session, cause },
      );
    }
    const delay = backoffDelay(this.reconnects, state.retryMs, this.policy, this._random);
    this.reconnects += 1;
    return delay;
  }

  async _endFromSessionInfo() {
    // A 204 from /events before this reader saw relay.end: it asked from past the end.
    const info = `${this._baseUrl}/relay/v1/sessions/${encodeURIComponent(this.session)}`;
    const response = await this._fetch(info, { headers: { accept: "application/json" } });
    if (response.status !== 200) throw await errorForResponse(response, this.session);
    const { state, reason, last_seq } = await response.json();
    return { state, reason, last_seq };
  }

  async *_events() {
    let response = await this._send(this.lastEventId);
    this.response = response;
    if (response.status !== 200 && response.status !== 204) {
      throw await errorForResponse(response, null);
    }
    this.session = response.headers.get(SESSION_HEADER) ?? this._sessionHint ?? null;
    const state = new ResumeState(this.session, this.lastEventId);
    const decoder = new EventDecoder();
    this.lastEventId = state.lastEventId;
    if (response.status === 204) {
      await response.body?.cancel();
      if (this.kind === "subscribe") this.end = await this._endFromSessionInfo();
      this.done = true;
      return;
    }
    let cause = null;
    try {
      for (;;) {
        if (response !== null) {
          const current = response;
          response = null;
          const reader = current.body.getReader();
          const text = new TextDecoder();
          let clean = false;
          try {
            for (;;) {
              const { done, value } = await reader.read();
              if (done) break;
              for (const block of state.feed(text.decode(value, { stream: true }))) {
                this.lastEventId = state.lastEventId;
                const event = decoder.decode(block);
                if (event === null) continue;
                if (this.kind === "subscribe" && event.event === "relay.end") {
                  this.end = JSON.parse(event.data);
                  this.done = true;
                  return;
                }
                yield event;
              }
            }
            clean = true;
          } catch (error) {
            if (this._userAborted()) throw error;
            cause = error;
          } finally {
            reader.cancel().catch(() => {});
            this._connection?.abort();
          }
          if (clean) {
            const blocks = state.feed(text.decode()).concat(state.finish().blocks);
            for (const block of blocks) {
              this.lastEventId = state.lastEventId;
              const event = decoder.decode(block);
              if (event === null) continue;
              if (this.kind === "subscribe" && event.event === "relay.end") {
                this.end = JSON.parse(event.data);
                this.done = true;
                return;
              }
              yield event;
            }
            if (this.kind !== "subscribe") {
              this.done = true; // a partial event at a clean end is not an event: dropped
              return;
            }
            // /events always ends with relay.end: a clean end without it is a break.
            cause = new RelayClientError("the event stream ended without relay.end", {
              session: this.session,
            });
          }
        }
        const delay = this._nextDelay(state, cause);
        const lastEventId = state.reconnect();
        this._onReconnect?.({ attempt: this.reconnects, lastEventId, delayMs: delay, cause });
        await this._sleep(delay, this._signal ?? undefined);
        let next;
        try {
          next = await this._send(lastEventId);
        } catch (error) {
          if (this._userAborted()) throw error;
          cause = error;
          continue;
        }
        if (next.status === 204) {
          // an EventSource endpoint: nothing is left
          await next.body?.cancel();
          if (this.kind === "subscribe" && this.end === null) {
            this.end = await this._endFromSessionInfo();
          }
          this.done = true;
          return;
        }
        if (next.status !== 200) {
          const error = await errorForResponse(next, this.session);
          if (!RETRYABLE_STATUSES.has(next.status)) throw error;
          cause = error;
          continue;
        }
        if (next.headers.get(SESSION_HEADER) !== this.session) {
          await next.body?.cancel();
          throw new RelayClientError(
            "the resume was not answered from the session's log (is the relay up?)",
            { status: 200, session: this.session },
          );
        }
        response = next;
      }
    } finally {
      this._connection?.abort();
      this._connection = null;
    }
  }
}

/**
 * Send `init` to `url` (as `fetch` would) and iterate the events of its event stream, each
 * exactly once, re-sending the same request with `Last-Event-ID` whenever the connection
 * breaks. A failed first request throws the typed error for its status.
 */
export function resumableFetch(url, init = {}, options = {}) {
  return new RelayStream(url, init, options, "fetch");
}

/**
 * Join a session as a viewer: `GET {baseUrl}/relay/v1/sessions/{id}/events`, from the start
 * or after `after` (an event id). Iteration ends at the session's `relay.end` event, which is
 * not yielded: its payload is `stream.end` (`{state, reason, last_seq}`).
 */
export function subscribe(baseUrl, sessionId, options = {}) {
  const { after, headers, signal, ...rest } = options;
  const base = String(baseUrl ?? "").replace(/\/+$/, "");
  let url = `${base}/relay/v1/sessions/${encodeURIComponent(sessionId)}/events`;
  if (after) url += `?after=${encodeURIComponent(after)}`;
  const init = { method: "GET", headers, signal };
  const stream = new RelayStream(url, init, { ...rest, baseUrl: base }, "subscribe");
  stream._sessionHint = sessionId;
  return stream;
}

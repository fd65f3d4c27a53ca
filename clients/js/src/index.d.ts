// Types for stream-relay-client (src/index.js).

/** One dispatched server-sent event. `id` is the last event id seen (it persists across
 * events, as in an EventSource); `retry` is this event's `retry:` field, if any. */
export interface RelayEvent {
  id: string;
  event: string;
  data: string;
  retry: number | null;
}

/** How a session ended, from its `relay.end` event. */
export interface RelayEnd {
  state: "done" | "cancelled" | "failed" | "open";
  reason: string;
  last_seq: number;
}

export interface ReconnectInfo {
  /** 1-based reconnect number. */
  attempt: number;
  /** The `Last-Event-ID` the reconnect sends. */
  lastEventId: string;
  delayMs: number;
  /** Why: the network error, the abort, or a retryable HTTP error. */
  cause: unknown;
}

export interface RetryPolicy {
  /** Reconnects per stream (default 8). */
  maxReconnects?: number;
  /** Backoff base in ms (default 100): attempt n waits uniform(0, min(cap, base * 2**n)). */
  baseMs?: number;
  /** Backoff cap in ms (default 5000). */
  capMs?: number;
}

export interface ResumeOptions extends RetryPolicy {
  /** The fetch to use (default: globalThis.fetch). */
  fetch?: typeof fetch;
  /** Random numbers in [0, 1) for the jitter (default Math.random). */
  random?: () => number;
  /** Waits between reconnects (default: setTimeout, cut short by the request's signal). */
  sleep?: (ms: number, signal?: AbortSignal) => Promise<void>;
  /** Called before each reconnect. */
  onReconnect?: (info: ReconnectInfo) => void;
}

export interface SubscribeOptions extends ResumeOptions {
  /** Start after this event id (`<session>:<seq>`); default: from the first event. */
  after?: string;
  headers?: HeadersInit;
  /** Aborting it ends the iteration with the signal's reason. */
  signal?: AbortSignal;
}

export declare class RelayStream implements AsyncIterable<RelayEvent> {
  readonly url: string | URL;
  /** The relay session (`x-relay-session`), once the first response arrived. */
  readonly session: string | null;
  /** The id a resume would send now: the last whole event's id. */
  readonly lastEventId: string | null;
  /** Reconnects made so far. */
  readonly reconnects: number;
  /** The first response. */
  readonly response: Response | null;
  /** `subscribe` only: how the session ended, once iteration finished. */
  readonly end: RelayEnd | null;
  /** True once the stream ended normally. */
  readonly done: boolean;
  /** Abort the current connection, not the stream: the client resumes with Last-Event-ID. */
  dropConnection(): void;
  [Symbol.asyncIterator](): AsyncGenerator<RelayEvent, void, undefined>;
}

/** POST (or any) request whose answer is an event stream, resumed across broken connections
 * by re-sending the same request with `Last-Event-ID`. The body must be re-sendable (string,
 * bytes, Blob, URLSearchParams, FormData; not a ReadableStream). */
export declare function resumableFetch(
  url: string | URL,
  init?: RequestInit,
  options?: ResumeOptions,
): RelayStream;

/** A viewer of a session: `GET {baseUrl}/relay/v1/sessions/{id}/events` until `relay.end`
 * (not yielded; see `RelayStream.end`). */
export declare function subscribe(
  baseUrl: string,
  sessionId: string,
  options?: SubscribeOptions,
): RelayStream;

export declare class RelayClientError extends Error {
  constructor(
    message: string,
    options?: { status?: number | null; code?: string | null; session?: string | null; cause?: unknown },
  );
  readonly status: number | null;
  readonly code: string | null;
  readonly session: string | null;
}
/** 410: the session expired or was evicted. */
export declare class SessionExpired extends RelayClientError {}
/** 404: the relay does not know the session. */
export declare class SessionNotFound extends RelayClientError {}
/** 401 / 403. */
export declare class Forbidden extends RelayClientError {}
/** Every allowed reconnect failed; `cause` is the last failure. */
export declare class RetryBudgetExhausted extends RelayClientError {
  constructor(
    message: string,
    options: { reconnects: number; session?: string | null; cause?: unknown },
  );
  readonly reconnects: number;
}

export declare function errorForStatus(
  status: number,
  bodyText: string,
  session?: string | null,
): RelayClientError;

/** Sans-IO resume state machine: text in, whole event blocks out. */
export declare class ResumeState {
  constructor(session: string | null, lastEventId?: string | null);
  session: string | null;
  lastEventId: string | null;
  retryMs: number | null;
  blocksSeen: number;
  feed(text: string): string[];
  finish(): { blocks: string[]; tail: string };
  reconnect(): string;
}

export declare class EventDecoder {
  lastId: string;
  decode(block: string): RelayEvent | null;
}

export declare const DEFAULT_POLICY: Readonly<Required<RetryPolicy>>;
export declare function backoffDelay(
  attempt: number,
  retryMs: number | null,
  policy?: Required<RetryPolicy>,
  random?: () => number,
): number;

export declare const SESSION_HEADER: "x-relay-session";
export declare const LAST_EVENT_ID_HEADER: "Last-Event-ID";
export declare const RETRYABLE_STATUSES: ReadonlySet<number>;

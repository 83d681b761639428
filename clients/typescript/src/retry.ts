// When to retry a failed call, and how long to wait first (the same rules as the Python client's).
//
// refscore answers UNAVAILABLE while a model loads, while it drains for a restart, and when a replica
// is gone; it answers RESOURCE_EXHAUSTED for a team over its quota with trailing metadata
// `retry-after-ms` (how long until the quota admits the request), and also for requests that can never
// succeed (over the size limits), without a hint. So: UNAVAILABLE is retried with exponential backoff
// (or the server's hint, if it sends one); RESOURCE_EXHAUSTED only when the server sent a hint, after
// that hint. Nothing is retried past the call's deadline.
import { status, type Metadata } from "@grpc/grpc-js";

export const RETRY_AFTER_KEY = "retry-after-ms";

/**
 * `maxAttempts` counts the first call (1 = never retry). Backoff before retry n (n = 1, 2, ...):
 * initialBackoffMs * multiplier^(n-1), capped at maxBackoffMs, of which a random half is waited (so
 * that many clients that failed together do not retry together). A server hint longer than
 * `maxHintMs` is not waited for: the error is raised at once.
 */
export interface RetryPolicy {
  maxAttempts: number;
  initialBackoffMs: number;
  multiplier: number;
  maxBackoffMs: number;
  maxHintMs: number;
}

export const DEFAULT_RETRY: Readonly<RetryPolicy> = Object.freeze({
  maxAttempts: 6,
  initialBackoffMs: 250,
  multiplier: 2,
  maxBackoffMs: 15_000,
  maxHintMs: 120_000,
});

export const NO_RETRY: Readonly<RetryPolicy> = Object.freeze({ ...DEFAULT_RETRY, maxAttempts: 1 });

export function checkPolicy(policy: RetryPolicy): RetryPolicy {
  if (!(policy.maxAttempts >= 1)) {
    throw new RangeError(`retry.maxAttempts must be >= 1, got ${policy.maxAttempts}`);
  }
  if (policy.initialBackoffMs < 0 || policy.maxBackoffMs < 0 || policy.multiplier < 1) {
    throw new RangeError("retry: backoffs must be >= 0 and multiplier >= 1");
  }
  return policy;
}

/** The server's hint (trailing metadata `retry-after-ms`) in milliseconds, if it sent a valid one. */
export function retryAfterMs(metadata: Metadata | undefined): number | undefined {
  const value = metadata?.get(RETRY_AFTER_KEY)[0];
  if (value === undefined) return undefined;
  const ms = Number(typeof value === "string" ? value : value.toString("ascii"));
  return Number.isFinite(ms) && ms >= 0 ? ms : undefined;
}

/**
 * Milliseconds to wait before attempt `attempt + 1`, or undefined: give up now.
 * `remainingMs`: time left before the call's deadline (undefined: no deadline).
 */
export function delayBeforeRetry(
  policy: RetryPolicy,
  code: status,
  hintMs: number | undefined,
  attempt: number,
  remainingMs: number | undefined,
  random: () => number = Math.random,
): number | undefined {
  if (attempt >= policy.maxAttempts) return undefined;
  let delay: number;
  if (code === status.UNAVAILABLE) {
    const ceiling = Math.min(policy.maxBackoffMs, policy.initialBackoffMs * policy.multiplier ** (attempt - 1));
    delay = hintMs ?? ceiling / 2 + random() * (ceiling / 2);
  } else if (code === status.RESOURCE_EXHAUSTED && hintMs !== undefined) {
    delay = hintMs;
  } else {
    return undefined;
  }
  if (hintMs !== undefined && hintMs > policy.maxHintMs) return undefined;
  if (remainingMs !== undefined && delay >= remainingMs) return undefined; // could not finish in time
  return delay;
}

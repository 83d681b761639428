// offdpo-client for TypeScript (Node): a client for refscore, the offdpo reference-model scoring service.
export {
  DEFAULT_DEADLINE_MS,
  DEFAULT_MAX_MESSAGE_BYTES,
  RefscoreCallError,
  RefscoreClient,
  type CallOptions,
  type Pem,
  type RefscoreClientOptions,
  type ScoreOptions,
} from "./client.js";
export { DEFAULT_RETRY, NO_RETRY, RETRY_AFTER_KEY, delayBeforeRetry, type RetryPolicy } from "./retry.js";
export {
  toItem,
  toPrompt,
  type AnswerLike,
  type Fingerprint,
  type ItemLike,
  type Message,
  type ModelInfo,
  type PromptLike,
  type ScoredItem,
  type ScoreResult,
} from "./types.js";
// The generated offdpo.v1 messages and service descriptor, for building requests by hand.
export * as v1 from "./gen/offdpo/v1/refscore_pb.js";
export * as records from "./gen/offdpo/v1/records_pb.js";

// Requests built from plain TypeScript values, and typed results read out of the responses.
import { create } from "@bufbuild/protobuf";

import {
  ChatMessageSchema,
  ConversationSchema,
  PromptSchema,
  TokenIdsSchema,
  type Prompt,
  type ReferenceFingerprint,
} from "./gen/offdpo/v1/records_pb.js";
import {
  ScoreItemSchema,
  type ModelInfo as ModelInfoMessage,
  type ScoreItem,
  type ScoreResponse,
} from "./gen/offdpo/v1/refscore_pb.js";

/** A chat message: `["user", "hi"]` or `{ role: "user", content: "hi" }`. */
export type Message = readonly [role: string, content: string] | { role: string; content: string };
/**
 * A prompt: plain text (used verbatim, no chat template), chat messages (the server applies the
 * model's chat template with the generation prompt), or `{ tokenIds }` (token ids, used verbatim).
 */
export type PromptLike = string | readonly Message[] | { tokenIds: readonly number[] };
/** An answer: text (tokenised by the server) or token ids (scored verbatim). */
export type AnswerLike = string | readonly number[];
/** An item to score: `[prompt, answer]`, or an object that also carries an `itemId` to echo back. */
export type ItemLike =
  | readonly [prompt: PromptLike, answer: AnswerLike]
  | { prompt: PromptLike; answer: AnswerLike; itemId?: string };

export function toPrompt(prompt: PromptLike): Prompt {
  if (typeof prompt === "string") {
    return create(PromptSchema, { kind: { case: "text", value: prompt } });
  }
  if (!Array.isArray(prompt)) {
    const ids = (prompt as { tokenIds: readonly number[] }).tokenIds;
    return create(PromptSchema, { kind: { case: "tokenIds", value: create(TokenIdsSchema, { ids: [...ids] }) } });
  }
  const messages = (prompt as readonly Message[]).map((m) => {
    const [role, content] = Array.isArray(m) ? m : [(m as { role: string }).role, (m as { content: string }).content];
    if (typeof role !== "string" || typeof content !== "string") {
      throw new TypeError(`a chat message is ["role", "content"] or {role, content} with strings, got ${JSON.stringify(m)}`);
    }
    return create(ChatMessageSchema, { role, content });
  });
  return create(PromptSchema, { kind: { case: "chat", value: create(ConversationSchema, { messages }) } });
}

export function toItem(item: ItemLike): ScoreItem {
  const [prompt, answer, itemId] = Array.isArray(item)
    ? [item[0] as PromptLike, item[1] as AnswerLike, ""]
    : [
        (item as { prompt: PromptLike }).prompt,
        (item as { answer: AnswerLike }).answer,
        (item as { itemId?: string }).itemId ?? "",
      ];
  return create(ScoreItemSchema, {
    prompt: toPrompt(prompt),
    itemId,
    answer:
      typeof answer === "string"
        ? { case: "answerText", value: answer }
        : { case: "answerTokenIds", value: create(TokenIdsSchema, { ids: [...answer] }) },
  });
}

/** What produced a score. Two scores are comparable only if their `fingerprintId` is equal. */
export interface Fingerprint {
  fingerprintId: string;
  modelId: string;
  weightsHash: string;
  tokenizerHash: string;
  chatTemplateHash: string;
  dtype: string;
  engine: string;
  engineVersion: string;
  /** "tp=2,pp=1" when the engine split the model over GPUs (not part of the id). */
  parallelLayout: string;
}

/**
 * One scored (prompt, answer). `tokenLogprobs[i]` = log p(answerTokenIds[i] | prompt, answer[:i]):
 * float32 on the wire, exactly representable as a JS number. `index`: the item's position in the request.
 */
export interface ScoredItem {
  index: number;
  itemId: string;
  promptTokenIds: number[];
  answerTokenIds: number[];
  tokenLogprobs: number[];
  logprobSum: number;
  fingerprint: Fingerprint;
}

export interface ScoreResult {
  items: ScoredItem[];
  fingerprint: Fingerprint;
}

/** A served model's fingerprint and the server's limits; `served`: every model the server serves. */
export interface ModelInfo {
  fingerprint: Fingerprint;
  maxModelLen: number;
  maxItemsPerRequest: number;
  maxTokensPerRequest: number;
  maxMessageBytes: number;
  /** -1 if none. */
  bosTokenId: number;
  eosTokenId: number;
  engineSettings: Record<string, string>;
  served: Fingerprint[];
}

export function toFingerprint(fp: ReferenceFingerprint | undefined): Fingerprint {
  return {
    fingerprintId: fp?.fingerprintId ?? "",
    modelId: fp?.modelId ?? "",
    weightsHash: fp?.weightsHash ?? "",
    tokenizerHash: fp?.tokenizerHash ?? "",
    chatTemplateHash: fp?.chatTemplateHash ?? "",
    dtype: fp?.dtype ?? "",
    engine: fp?.engine ?? "",
    engineVersion: fp?.engineVersion ?? "",
    parallelLayout: fp?.parallelLayout ?? "",
  };
}

export function toScoreResult(response: ScoreResponse): ScoreResult {
  const fingerprint = toFingerprint(response.fingerprint);
  return {
    fingerprint,
    items: response.items.map((item) => ({
      index: item.itemIndex,
      itemId: item.itemId,
      promptTokenIds: [...item.promptTokenIds],
      answerTokenIds: [...item.answerTokenIds],
      tokenLogprobs: [...item.tokenLogprobs],
      logprobSum: item.logprobSum,
      fingerprint,
    })),
  };
}

export function toModelInfo(info: ModelInfoMessage): ModelInfo {
  return {
    fingerprint: toFingerprint(info.fingerprint),
    maxModelLen: info.maxModelLen,
    maxItemsPerRequest: info.maxItemsPerRequest,
    // int64 on the wire (bigint here); the limits are far below 2^53.
    maxTokensPerRequest: Number(info.maxTokensPerRequest),
    maxMessageBytes: Number(info.maxMessageBytes),
    bosTokenId: info.bosTokenId,
    eosTokenId: info.eosTokenId,
    engineSettings: { ...info.engineSettings },
    served: info.served.map(toFingerprint),
  };
}

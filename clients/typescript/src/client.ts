// RefscoreClient: refscore's RPCs with retries, deadlines, TLS, team tokens and load balancing.
import { readFileSync } from "node:fs";
import { setTimeout as sleep } from "node:timers/promises";

import { create, fromBinary, toBinary, type DescMessage, type MessageShape } from "@bufbuild/protobuf";
import * as grpc from "@grpc/grpc-js";

import {
  GetModelInfoRequestSchema,
  RefScore,
  ScoreRequestSchema,
  type ScoreResponse,
} from "./gen/offdpo/v1/refscore_pb.js";
import { checkPolicy, DEFAULT_RETRY, delayBeforeRetry, retryAfterMs, type RetryPolicy } from "./retry.js";
import { toItem, toModelInfo, toScoreResult, type ItemLike, type ModelInfo, type ScoreResult } from "./types.js";

export const DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024;
export const DEFAULT_DEADLINE_MS = 300_000;
const HEALTH_CHECK = "/grpc.health.v1.Health/Check";
const SERVING = 1; // grpc.health.v1.HealthCheckResponse.ServingStatus.SERVING

/** PEM material: a file path, or the PEM itself (a Buffer, or a string holding "-----BEGIN"). */
export type Pem = string | Buffer;

export interface RefscoreClientOptions {
  /** Your team's bearer token, sent as `authorization: Bearer <token>` on every call. */
  token?: string;
  /** TLS: the CA that verifies the server (PEM). Setting `ca`, `cert` or `tls: true` turns TLS on. */
  ca?: Pem;
  /** Mutual TLS: this client's certificate and key (PEM), both or neither. */
  cert?: Pem;
  key?: Pem;
  /** TLS against the system's roots without a `ca`. Default: TLS when any PEM is given, else plaintext. */
  tls?: boolean;
  /** The name the server's certificate must carry, when it differs from the target's host. */
  tlsServerName?: string;
  /** Default deadline of one call, retries and waits included (default 300 000; null: none). */
  deadlineMs?: number | null;
  /** Which failures are retried and how (merged over DEFAULT_RETRY; NO_RETRY turns retries off). */
  retry?: Partial<RetryPolicy>;
  /** "round_robin" (default) spreads calls over every address a `dns:///` target resolves to. */
  loadBalancing?: "round_robin" | "pick_first";
  maxMessageBytes?: number;
  /** Further grpc-js channel options (they win over the client's). */
  channelOptions?: grpc.ChannelOptions;
}

export interface CallOptions {
  /** This call's deadline, retries included (default: the client's `deadlineMs`; null: none). */
  deadlineMs?: number | null;
}

export interface ScoreOptions extends CallOptions {
  /** The model to score with, by fingerprint id (empty: the server's primary). */
  expectedFingerprintId?: string;
}

/** A call that failed for good (not retryable, out of attempts, or out of time). */
export class RefscoreCallError extends Error {
  readonly code: grpc.status;
  readonly details: string;
  /** The last attempt's trailing metadata. */
  readonly metadata: grpc.Metadata;
  readonly retryAfterMs: number | undefined;

  constructor(
    readonly method: string,
    error: grpc.ServiceError,
    readonly attempts: number,
  ) {
    const after = attempts > 1 ? ` (after ${attempts} attempts)` : "";
    super(`refscore ${method}: ${grpc.status[error.code]}: ${error.details}${after}`, { cause: error });
    this.name = "RefscoreCallError";
    this.code = error.code;
    this.details = error.details;
    this.metadata = error.metadata ?? new grpc.Metadata();
    this.retryAfterMs = retryAfterMs(error.metadata);
  }
}

function isServiceError(error: unknown): error is grpc.ServiceError {
  return error instanceof Error && typeof (error as Partial<grpc.ServiceError>).code === "number";
}

function readPem(pem: Pem | undefined, what: string): Buffer | null {
  if (pem === undefined) return null;
  if (Buffer.isBuffer(pem)) return pem;
  if (pem.includes("-----BEGIN")) return Buffer.from(pem);
  try {
    return readFileSync(pem);
  } catch (error) {
    throw new Error(`refscore client: cannot read the ${what} file '${pem}': ${(error as Error).message}`);
  }
}

/** HealthCheckResponse.status from its wire bytes (field 1, a varint; absent = 0, UNKNOWN). */
function healthStatus(response: Buffer): number {
  if (response.length === 0 || response[0] !== 0x08) return 0;
  let value = 0;
  for (let i = 1, shift = 0; i < response.length && shift < 35; i++, shift += 7) {
    value |= (response[i]! & 0x7f) << shift;
    if (!(response[i]! & 0x80)) return value;
  }
  return 0;
}

const identity = (bytes: Buffer): Buffer => bytes;

/**
 * A client for refscore (offdpo.v1.RefScore).
 *
 * `target`: "host:port", or "dns:///refscore-headless.ns.svc.cluster.local:50051" to spread calls over
 * every address DNS returns (a Kubernetes headless Service's pods) with `loadBalancing`.
 */
export class RefscoreClient {
  readonly target: string;
  readonly retry: RetryPolicy;
  readonly deadlineMs: number | null;
  /** The grpc-js client, for calls this class does not wrap (`makeUnaryRequest`, ...). */
  readonly grpcClient: grpc.Client;
  private readonly metadata: grpc.Metadata;

  constructor(target: string, options: RefscoreClientOptions = {}) {
    if (!target) throw new Error("refscore client: target is empty (use host:port or dns:///host:port)");
    this.target = target;
    this.retry = checkPolicy({ ...DEFAULT_RETRY, ...options.retry });
    this.deadlineMs = options.deadlineMs === undefined ? DEFAULT_DEADLINE_MS : options.deadlineMs;
    if (this.deadlineMs !== null && !(this.deadlineMs > 0)) {
      throw new RangeError(`refscore client: deadlineMs must be > 0 or null (no deadline), got ${this.deadlineMs}`);
    }
    if ((options.cert === undefined) !== (options.key === undefined)) {
      throw new Error("refscore client: mutual TLS needs both a client certificate (cert) and its key (key)");
    }
    const tls = options.tls ?? (options.ca !== undefined || options.cert !== undefined);
    if (!tls && options.tlsServerName) {
      throw new Error("refscore client: tlsServerName needs TLS (set ca, cert/key or tls: true)");
    }
    const credentials = tls
      ? grpc.credentials.createSsl(
          readPem(options.ca, "CA"),
          readPem(options.key, "client key"),
          readPem(options.cert, "client certificate"),
        )
      : grpc.credentials.createInsecure();
    const maxBytes = options.maxMessageBytes ?? DEFAULT_MAX_MESSAGE_BYTES;
    const channelOptions: grpc.ChannelOptions = {
      "grpc.max_receive_message_length": maxBytes,
      "grpc.max_send_message_length": maxBytes,
      "grpc.service_config": JSON.stringify({ loadBalancingConfig: [{ [options.loadBalancing ?? "round_robin"]: {} }] }),
      ...(options.tlsServerName
        ? { "grpc.ssl_target_name_override": options.tlsServerName, "grpc.default_authority": options.tlsServerName }
        : {}),
      ...options.channelOptions,
    };
    this.grpcClient = new grpc.Client(target, credentials, channelOptions);
    // The token as call metadata on every call: grpc-js sends call credentials only over TLS, and a
    // plaintext refscore (local development, a cluster without TLS) checks tokens too.
    this.metadata = new grpc.Metadata();
    if (options.token) this.metadata.set("authorization", `Bearer ${options.token}`);
  }

  /** Scores one request's items (at most ModelInfo.maxItemsPerRequest), as typed results. */
  async score(items: Iterable<ItemLike>, options: ScoreOptions = {}): Promise<ScoreResult> {
    return toScoreResult(await this.scoreRaw(items, options));
  }

  /** Score as the wire message (the generated ScoreResponse); `score` gives typed results. */
  scoreRaw(items: Iterable<ItemLike>, options: ScoreOptions = {}): Promise<ScoreResponse> {
    const request = create(ScoreRequestSchema, {
      items: Array.from(items, toItem),
      expectedFingerprintId: options.expectedFingerprintId ?? "",
    });
    return this.unary(RefScore.method.score, request, options);
  }

  /** The served model's fingerprint and limits (`fingerprintId` picks a model; empty: the primary). */
  async modelInfo(options: CallOptions & { fingerprintId?: string } = {}): Promise<ModelInfo> {
    const request = create(GetModelInfoRequestSchema, { fingerprintId: options.fingerprintId ?? "" });
    return toModelInfo(await this.unary(RefScore.method.getModelInfo, request, { deadlineMs: 30_000, ...options }));
  }

  /** Waits until the server's health check says SERVING (the model is loaded). */
  async waitServing(timeoutMs = 300_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    let last = "no answer";
    while (Date.now() < deadline) {
      try {
        const response = await this.call(HEALTH_CHECK, identity, identity, Buffer.alloc(0), Date.now() + 5_000);
        const code = healthStatus(response);
        if (code === SERVING) return;
        last = ({ 0: "UNKNOWN", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN" } as Record<number, string>)[code] ?? `${code}`;
      } catch (error) {
        if (!isServiceError(error)) throw error;
        last = grpc.status[error.code] ?? `${error.code}`;
      }
      await sleep(500);
    }
    throw new Error(`refscore at ${this.target} did not become SERVING within ${timeoutMs / 1000} s (last: ${last})`);
  }

  close(): void {
    this.grpcClient.close();
  }

  // -- calls and retries -------------------------------------------------------------------------
  private call<I, O>(
    path: string,
    serialize: (value: I) => Buffer,
    deserialize: (bytes: Buffer) => O,
    request: I,
    deadline: number | undefined,
  ): Promise<O> {
    return new Promise((resolve, reject) => {
      this.grpcClient.makeUnaryRequest(
        path,
        serialize,
        deserialize,
        request,
        this.metadata.clone(),
        deadline === undefined ? {} : { deadline },
        (error, response) => (error ? reject(error) : resolve(response as O)),
      );
    });
  }

  private async unary<I extends DescMessage, O extends DescMessage>(
    method: { name: string; input: I; output: O },
    request: MessageShape<I>,
    options: CallOptions,
  ): Promise<MessageShape<O>> {
    const path = `/${RefScore.typeName}/${method.name}`;
    const deadlineMs = options.deadlineMs === undefined ? this.deadlineMs : options.deadlineMs;
    const deadline = deadlineMs === null ? undefined : Date.now() + deadlineMs;
    const serialize = (message: MessageShape<I>) => Buffer.from(toBinary(method.input, message));
    const deserialize = (bytes: Buffer) => fromBinary(method.output, bytes);
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.call(path, serialize, deserialize, request, deadline);
      } catch (error) {
        if (!isServiceError(error)) throw error;
        const remaining = deadline === undefined ? undefined : Math.max(0, deadline - Date.now());
        const delay = delayBeforeRetry(this.retry, error.code, retryAfterMs(error.metadata), attempt, remaining);
        if (delay === undefined) throw new RefscoreCallError(method.name, error, attempt);
        await sleep(delay);
      }
    }
  }
}

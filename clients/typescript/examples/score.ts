import { RefscoreClient } from "offdpo-client";

const client = new RefscoreClient(process.argv[2] ?? "localhost:50051", { token: process.env.REFSCORE_TOKEN }); // prod: dns:///<headless svc>:50051, ca: "ca.pem"
const result = await client.score([
  [[["user", "What is 2+2?"]], "4"], // chat messages: the server applies the model's chat template
  ["The capital of France is", " Paris"], // plain text, used verbatim
]);
const items = result.items.map(({ answerTokenIds, tokenLogprobs, logprobSum }) => ({ answerTokenIds, tokenLogprobs, logprobSum }));
console.log(JSON.stringify({ fingerprintId: result.fingerprint.fingerprintId, items })); // compare scores only under one fingerprintId
client.close();

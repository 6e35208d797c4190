// The official `openai` npm package against the openai-router gateway.
//
// Run by tests/gateway.rs: `node client.mjs`, with OPENAI_BASE_URL and OPENAI_API_KEY set,
// from a folder where `openai` is installed. Exits non-zero when the gateway misbehaves.

import assert from "node:assert/strict";
import OpenAI from "openai";

const client = new OpenAI({ maxRetries: 0 });
const messages = [{ role: "user", content: "Say hello" }];

// A chat completion, with its usage.
const answer = await client.chat.completions.create({ model: "gpt-4o-mini", messages, max_tokens: 5 });
assert.ok(answer.choices[0].message.content, JSON.stringify(answer));
assert.equal(answer.usage.completion_tokens, 5);

// A stream, read chunk by chunk, with the usage chunk asked for.
const stream = await client.chat.completions.create({
  model: "gpt-4o-mini",
  messages,
  max_tokens: 6,
  stream: true,
  stream_options: { include_usage: true },
});
let text = "";
let usage = null;
for await (const chunk of stream) {
  text += chunk.choices[0]?.delta?.content ?? "";
  usage = chunk.usage ?? usage;
}
assert.ok(text.length > 0, "no content streamed");
assert.equal(usage?.completion_tokens, 6);

// Embeddings.
const embedded = await client.embeddings.create({ model: "text-embedding-3-small", input: ["a", "b"] });
assert.equal(embedded.data.length, 2);

// A streamed legacy completion.
const legacy = await client.completions.create({
  model: "gpt-3.5-turbo-instruct",
  prompt: "Say hello",
  max_tokens: 4,
  stream: true,
});
let legacyText = "";
for await (const chunk of legacy) {
  legacyText += chunk.choices[0]?.text ?? "";
}
assert.equal(legacyText.trim().split(/\s+/).length, 4, legacyText);

// The Responses API: a stored response, streamed, then continued where it is stored,
// retrieved and deleted.
const events = await client.responses.create({
  model: "gpt-4o-mini",
  input: "Say hello",
  max_output_tokens: 5,
  stream: true,
});
let created = null;
let deltas = "";
for await (const event of events) {
  if (event.type === "response.output_text.delta") deltas += event.delta;
  if (event.type === "response.completed") created = event.response;
}
assert.ok(created, "no response.completed event");
assert.equal(created.output_text ?? created.output[0].content[0].text, deltas);
const next = await client.responses.create({
  model: "gpt-4o-mini",
  input: "And then?",
  previous_response_id: created.id,
  max_output_tokens: 3,
});
assert.equal(next.status, "completed");
assert.equal((await client.responses.retrieve(created.id)).id, created.id);
// `del` in the SDK's v4, `delete` from v5.
const remove = client.responses.delete ?? client.responses.del;
await remove.call(client.responses, created.id);
await assert.rejects(
  client.responses.retrieve(created.id),
  (error) => error instanceof OpenAI.NotFoundError && error.status === 404,
);

// A fallback: `gpt-4o`'s only endpoint fails; `gpt-4o-mini` serves, and the header says so.
const { data, response } = await client.chat.completions
  .create({ model: "gpt-4o", messages, max_tokens: 4 })
  .withResponse();
assert.equal(response.headers.get("x-openai-router-model"), "gpt-4o-mini");
assert.ok(data.choices[0].message.content);

// A wrong key: the SDK's typed error, with OpenAI's error shape.
const stranger = new OpenAI({ apiKey: "sk-not-a-gateway-key", maxRetries: 0 });
await assert.rejects(
  stranger.chat.completions.create({ model: "gpt-4o-mini", messages }),
  (error) => error instanceof OpenAI.AuthenticationError && error.status === 401,
);

console.log("ok node");

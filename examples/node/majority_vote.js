#!/usr/bin/env node
// A streamed majority vote (Router.RunStream) against a Trellis router, from protos/ with
// @grpc/proto-loader: no generated code, no Trellis library.
//
//   npm ci && node majority_vote.js [ROUTER] [--question Q] [--n N] [--params JSON]
//                                   [--max-tokens N] [--temperature T] [--seed N] [--deadline SECONDS]
//
// ROUTER: host:port, else $TRELLIS_ROUTER, else 127.0.0.1:50051 (the router's default port; it serves on
// loopback unless started with --host). $TRELLIS_TOKEN: a bearer token for a router with an auth file.
// $TRELLIS_TLS_CA: a CA certificate (PEM) to connect over TLS. Exit status 0 with an answer, 1 when the
// call failed (the gRPC status is printed), 2 for bad arguments.
'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const PROTOS = path.resolve(__dirname, '..', '..', 'protos');

function usage(message) {
  if (message) console.error(`majority_vote.js: ${message}`);
  console.error('usage: node majority_vote.js [ROUTER] [--question Q] [--n N] [--params JSON] ' +
                '[--max-tokens N] [--temperature T] [--seed N] [--deadline SECONDS]');
  process.exit(2);
}

function parseArgs(argv) {
  const args = {
    router: process.env.TRELLIS_ROUTER || '127.0.0.1:50051',
    question: 'What is 15 + 27?',
    params: { n: 8 },
    maxTokens: 96,
    temperature: 0.7,
    seed: undefined,
    deadline: 300,
  };
  const number = (flag, text) => {
    const value = Number(text);
    if (text === undefined || text === '' || Number.isNaN(value)) usage(`${flag} needs a number, got ${text}`);
    return value;
  };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    switch (arg) {
      case '--question': args.question = argv[++i]; break;
      case '--n': args.params.n = number(arg, argv[++i]); break;
      case '--params':
        try { args.params = JSON.parse(argv[++i]); } catch (err) { usage(`--params: ${err.message}`); }
        break;
      case '--max-tokens': args.maxTokens = number(arg, argv[++i]); break;
      case '--temperature': args.temperature = number(arg, argv[++i]); break;
      case '--seed': args.seed = number(arg, argv[++i]); break;
      case '--deadline': args.deadline = number(arg, argv[++i]); break;
      case '-h': case '--help': usage(); break;
      default:
        if (arg.startsWith('-')) usage(`unknown option ${arg}`);
        args.router = arg;
    }
  }
  if (typeof args.question !== 'string') usage('--question needs a value');
  return args;
}

// ---- google.protobuf.Struct <-> plain objects --------------------------------------------------------------
// RunRequest.params (a controller's parameters) is a google.protobuf.Struct. protobufjs, which proto-loader
// uses, defines Struct and Value itself with camelCase field names (numberValue, stringValue, boolValue,
// structValue, listValue, nullValue), even with keepCase: true, which keeps every field of protos/ snake_case.
// So n = 8 is {fields: {n: {numberValue: 8}}}. Written {n: {number_value: 8}}, protobufjs drops the key it
// does not know, the Value goes out empty, and the router answers INVALID_ARGUMENT
// "params.n: expected a number, got no value (...)".

function toValue(v) {
  if (v === null || v === undefined) return { nullValue: 0 };
  if (typeof v === 'number') return { numberValue: v };       // every number is a double on the wire
  if (typeof v === 'string') return { stringValue: v };
  if (typeof v === 'boolean') return { boolValue: v };
  if (Array.isArray(v)) return { listValue: { values: v.map(toValue) } };
  return { structValue: toStruct(v) };
}

function toStruct(obj) {
  return { fields: Object.fromEntries(Object.entries(obj).map(([k, v]) => [k, toValue(v)])) };
}

// With oneofs: true, a decoded Value says which of its fields is set in `kind`.
function fromValue(v) {
  switch (v && v.kind) {
    case 'numberValue': return v.numberValue;
    case 'stringValue': return v.stringValue;
    case 'boolValue': return v.boolValue;
    case 'listValue': return (v.listValue.values || []).map(fromValue);
    case 'structValue': return fromStruct(v.structValue);
    default: return null;
  }
}

function fromStruct(s) {
  return Object.fromEntries(Object.entries((s && s.fields) || {}).map(([k, v]) => [k, fromValue(v)]));
}

// ---- gRPC's rich error model ----------------------------------------------------------------------------------
// Besides code and message, the router's errors carry a google.rpc.Status in the grpc-status-details-bin
// trailer: BadRequest names the field at fault, ErrorInfo gives a reason, RetryInfo says when to retry.
// ../rich_status.proto declares the fields read here.

const rich = new protobuf.Root().loadSync(path.resolve(__dirname, '..', 'rich_status.proto'), { keepCase: true });

function richDetails(metadata) {
  const raw = metadata && metadata.get('grpc-status-details-bin')[0];
  if (!raw) return [];
  const lines = [];
  for (const detail of rich.lookupType('trellis.examples.RpcStatus').decode(raw).details) {
    const type = detail.type_url.slice(detail.type_url.lastIndexOf('/') + 1);
    if (type === 'google.rpc.BadRequest') {
      for (const v of rich.lookupType('trellis.examples.BadRequest').decode(detail.value).field_violations) {
        lines.push(`field: ${v.field}`);
      }
    } else if (type === 'google.rpc.ErrorInfo') {
      lines.push(`reason: ${rich.lookupType('trellis.examples.ErrorInfo').decode(detail.value).reason}`);
    } else if (type === 'google.rpc.RetryInfo') {
      const delay = rich.lookupType('trellis.examples.RetryInfo').decode(detail.value).retry_delay || {};
      lines.push(`retry after: ${Number(delay.seconds || 0) + (delay.nanos || 0) / 1e9} s`);
    }
  }
  return lines;
}

// ---- the run --------------------------------------------------------------------------------------------------

function main() {
  const args = parseArgs(process.argv.slice(2));
  const definition = protoLoader.loadSync('trellis/v1/router.proto', {
    includeDirs: [PROTOS],
    keepCase: true,      // field names as in the .proto files: stream_tokens, max_tokens, tasks_done...
    longs: String,
    enums: String,       // finish_reason: 'FINISH_REASON_STOP'
    defaults: true,      // unset numbers read as 0, not undefined
    oneofs: true,        // RunEvent.event and Value.kind name the field that is set
  });
  const trellis = grpc.loadPackageDefinition(definition).trellis.v1;

  const credentials = process.env.TRELLIS_TLS_CA
    ? grpc.credentials.createSsl(fs.readFileSync(process.env.TRELLIS_TLS_CA))
    : grpc.credentials.createInsecure();
  const client = new trellis.Router(args.router, credentials);

  const metadata = new grpc.Metadata();
  if (process.env.TRELLIS_TOKEN) metadata.set('authorization', `Bearer ${process.env.TRELLIS_TOKEN}`);

  const request = {
    controller: 'majority_vote',
    prompt: { chat: { messages: [{ role: 'user', content: args.question }] } },
    sampling: { temperature: args.temperature, max_tokens: args.maxTokens, seed: args.seed },
    params: toStruct(args.params),   // e.g. {fields: {n: {numberValue: 8}}}: see toValue above
    stream_tokens: false,            // progress, votes and the result; true adds every sample's tokens
  };
  console.log(`router ${args.router}: majority_vote ${JSON.stringify(args.params)} over ${JSON.stringify(args.question)}`);

  let answered = false;
  const call = client.RunStream(request, metadata, { deadline: Date.now() + args.deadline * 1000 });
  call.on('data', (event) => {
    const ms = event.elapsed_ms.toFixed(0).padStart(6);
    switch (event.event) {
      case 'started':
        console.log(`${ms} ms  started ${event.started.controller} ${JSON.stringify(fromStruct(event.started.params))}`);
        break;
      case 'progress': {
        const p = event.progress;
        console.log(`${ms} ms  progress ${p.stage} ${p.tasks_done}/${p.tasks_total}: ${p.message}`);
        break;
      }
      case 'intermediate': {
        const i = event.intermediate;
        console.log(`${ms} ms  ${i.kind} ${i.branch}: ${JSON.stringify(i.answer)} ` +
                    `(tally ${JSON.stringify(fromStruct(i.details).votes || {})})`);
        break;
      }
      case 'result': {
        const r = event.result;
        const details = fromStruct(r.details);
        answered = true;
        console.log(`answer: ${r.answer}`);
        console.log(`votes: ${JSON.stringify(details.votes || {})} share ${details.share}`);
        console.log(`usage: ${r.usage.completion_tokens} completion tokens in ${r.usage.tasks} tasks, ` +
                    `${r.timings.total_ms.toFixed(0)} ms`);
        break;
      }
      case 'error':   // Session streams report a run's error this way; RunStream ends with a status instead
        console.error(`error: code ${event.error.code}: ${event.error.message}`);
        process.exitCode = 1;
        break;
      default:        // 'delta' (stream_tokens) and kinds added to the contract later
        break;
    }
  });
  call.on('error', (err) => {
    console.error(`error: ${grpc.status[err.code]} (${err.code}): ${err.details}`);
    for (const line of richDetails(err.metadata)) console.error(`  ${line}`);
    process.exitCode = 1;
    client.close();
  });
  call.on('end', () => {
    if (!answered && !process.exitCode) {
      console.error('error: the stream ended without a result');
      process.exitCode = 1;
    }
    client.close();
  });
}

main();

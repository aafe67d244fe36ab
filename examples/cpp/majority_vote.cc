// A streamed majority vote (Router.RunStream) against a Trellis router, in C++ with stubs that protoc and
// grpc_cpp_plugin generate from protos/ at build time (see the Makefile).
//
//   make && ./build/majority_vote [ROUTER] [--question Q] [--n N] [--params JSON]
//                                 [--max-tokens N] [--temperature T] [--seed N] [--deadline SECONDS]
//
// ROUTER: host:port, else $TRELLIS_ROUTER, else 127.0.0.1:50051 (the router's default port; it serves on
// loopback unless started with --host). $TRELLIS_TOKEN: a bearer token for a router with an auth file.
// $TRELLIS_TLS_CA: a CA certificate (PEM) to connect over TLS. Exit status 0 with an answer, 1 when the
// call failed (the gRPC status is printed), 2 for bad arguments.

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>

#include <google/protobuf/struct.pb.h>
#include <google/protobuf/util/json_util.h>
#include <grpcpp/grpcpp.h>

#include "rich_status.pb.h"
#include "trellis/v1/router.grpc.pb.h"

namespace {

namespace pb = google::protobuf;

const char* kUsage =
    "usage: majority_vote [ROUTER] [--question Q] [--n N] [--params JSON] [--max-tokens N] "
    "[--temperature T] [--seed N] [--deadline SECONDS]\n";

struct Args {
  std::string router = "127.0.0.1:50051";
  std::string question = "What is 15 + 27?";
  std::string params_json = "{\"n\": 8}";
  double max_tokens = 96;
  double temperature = 0.7;
  double deadline_s = 300;
  std::string seed;  // empty: unset (the worker picks one)
};

[[noreturn]] void Usage(const std::string& message) {
  if (!message.empty()) std::cerr << "majority_vote: " << message << "\n";
  std::cerr << kUsage;
  std::exit(2);
}

double Number(const std::string& flag, const char* text) {
  char* end = nullptr;
  double value = text ? std::strtod(text, &end) : 0;
  if (!text || *text == '\0' || *end != '\0') Usage(flag + " needs a number");
  return value;
}

Args ParseArgs(int argc, char** argv) {
  Args args;
  if (const char* env = std::getenv("TRELLIS_ROUTER"); env && *env) args.router = env;
  std::string n;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    const char* next = i + 1 < argc ? argv[i + 1] : nullptr;
    if (arg == "--question" && next) {
      args.question = argv[++i];
    } else if (arg == "--n") {
      Number(arg, next);
      n = argv[++i];
    } else if (arg == "--params" && next) {
      args.params_json = argv[++i];
    } else if (arg == "--max-tokens") {
      args.max_tokens = Number(arg, next), ++i;
    } else if (arg == "--temperature") {
      args.temperature = Number(arg, next), ++i;
    } else if (arg == "--seed") {
      Number(arg, next);
      args.seed = argv[++i];
    } else if (arg == "--deadline") {
      args.deadline_s = Number(arg, next), ++i;
    } else if (arg == "-h" || arg == "--help") {
      Usage("");
    } else if (!arg.empty() && arg[0] == '-') {
      Usage("unknown option or missing value: " + arg);
    } else {
      args.router = arg;
    }
  }
  if (!n.empty()) args.params_json = "{\"n\": " + n + "}";
  return args;
}

// A message as one line of JSON: Struct and Value print as the JSON they stand for ({"n": 8}).
std::string Json(const pb::Message& message) {
  std::string out;
  pb::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;
  if (!pb::util::MessageToJsonString(message, &out, options).ok()) return "?";
  return out;
}

std::string FieldJson(const pb::Struct& s, const std::string& key, const std::string& absent) {
  auto it = s.fields().find(key);
  return it == s.fields().end() ? absent : Json(it->second);
}

// Besides code and message, the router's errors carry a google.rpc.Status in the grpc-status-details-bin
// trailer (grpc::Status::error_details()): BadRequest names the field at fault, ErrorInfo gives a reason,
// RetryInfo says when to retry. ../rich_status.proto declares the fields read here.
void PrintRichDetails(const std::string& raw) {
  trellis::examples::RpcStatus status;
  if (raw.empty() || !status.ParseFromString(raw)) return;
  for (const pb::Any& detail : status.details()) {
    const std::string& url = detail.type_url();
    std::string type = url.substr(url.rfind('/') + 1);
    if (type == "google.rpc.BadRequest") {
      trellis::examples::BadRequest bad;
      if (bad.ParseFromString(detail.value())) {
        for (const auto& v : bad.field_violations()) std::cerr << "  field: " << v.field() << "\n";
      }
    } else if (type == "google.rpc.ErrorInfo") {
      trellis::examples::ErrorInfo info;
      if (info.ParseFromString(detail.value())) std::cerr << "  reason: " << info.reason() << "\n";
    } else if (type == "google.rpc.RetryInfo") {
      trellis::examples::RetryInfo retry;
      if (retry.ParseFromString(detail.value())) {
        std::cerr << "  retry after: " << retry.retry_delay().seconds() + retry.retry_delay().nanos() / 1e9
                  << " s\n";
      }
    }
  }
}

const char* CodeName(grpc::StatusCode code) {
  static const char* names[] = {"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
                                "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
                                "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL",
                                "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"};
  int i = static_cast<int>(code);
  return i >= 0 && i <= 16 ? names[i] : "?";
}

std::string Ms(double ms) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%6.0f ms", ms);
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  Args args = ParseArgs(argc, argv);

  trellis::v1::RunRequest request;
  request.set_controller("majority_vote");
  auto* message = request.mutable_prompt()->mutable_chat()->add_messages();
  message->set_role("user");
  message->set_content(args.question);
  request.mutable_sampling()->set_temperature(static_cast<float>(args.temperature));
  request.mutable_sampling()->set_max_tokens(static_cast<int>(args.max_tokens));
  if (!args.seed.empty()) request.mutable_sampling()->set_seed(std::strtoull(args.seed.c_str(), nullptr, 10));
  // Controller parameters are a google.protobuf.Struct. The generated C++ types have no naming trap (that is
  // protobufjs'); here the JSON parser builds it: {"n": 8} is fields["n"].number_value = 8.
  auto parsed = pb::util::JsonStringToMessage(args.params_json, request.mutable_params());
  if (!parsed.ok()) Usage("--params: " + std::string(parsed.message()));
  request.set_stream_tokens(false);  // progress, votes and the result; true adds every sample's tokens

  std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials();
  if (const char* ca = std::getenv("TRELLIS_TLS_CA"); ca && *ca) {
    std::ifstream file(ca);
    std::stringstream pem;
    pem << file.rdbuf();
    grpc::SslCredentialsOptions options;
    options.pem_root_certs = pem.str();
    credentials = grpc::SslCredentials(options);
  }
  auto stub = trellis::v1::Router::NewStub(grpc::CreateChannel(args.router, credentials));

  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::milliseconds(static_cast<long long>(args.deadline_s * 1000)));
  if (const char* token = std::getenv("TRELLIS_TOKEN"); token && *token) {
    context.AddMetadata("authorization", std::string("Bearer ") + token);
  }

  std::cout << "router " << args.router << ": majority_vote " << Json(request.params()) << " over \""
            << args.question << "\"" << std::endl;

  bool answered = false;
  int exit_code = 0;
  std::unique_ptr<grpc::ClientReader<trellis::v1::RunEvent>> stream = stub->RunStream(&context, request);
  trellis::v1::RunEvent event;
  while (stream->Read(&event)) {
    std::string ms = Ms(event.elapsed_ms());
    switch (event.event_case()) {
      case trellis::v1::RunEvent::kStarted:
        std::cout << ms << "  started " << event.started().controller() << " " << Json(event.started().params())
                  << std::endl;
        break;
      case trellis::v1::RunEvent::kProgress: {
        const auto& p = event.progress();
        std::cout << ms << "  progress " << p.stage() << " " << p.tasks_done() << "/" << p.tasks_total() << ": "
                  << p.message() << std::endl;
        break;
      }
      case trellis::v1::RunEvent::kIntermediate: {
        const auto& i = event.intermediate();
        pb::Value answer;
        answer.set_string_value(i.answer());
        std::cout << ms << "  " << i.kind() << " " << i.branch() << ": " << Json(answer) << " (tally "
                  << FieldJson(i.details(), "votes", "{}") << ")" << std::endl;
        break;
      }
      case trellis::v1::RunEvent::kResult: {
        const auto& r = event.result();
        answered = true;
        std::cout << "answer: " << r.answer() << "\n"
                  << "votes: " << FieldJson(r.details(), "votes", "{}") << " share "
                  << FieldJson(r.details(), "share", "0") << "\n"
                  << "usage: " << r.usage().completion_tokens() << " completion tokens in " << r.usage().tasks()
                  << " tasks, " << static_cast<long long>(r.timings().total_ms()) << " ms" << std::endl;
        break;
      }
      case trellis::v1::RunEvent::kError:  // Session streams report a run's error this way
        std::cerr << "error: code " << event.error().code() << ": " << event.error().message() << std::endl;
        exit_code = 1;
        break;
      default:  // deltas (stream_tokens) and kinds added to the contract later
        break;
    }
  }
  grpc::Status status = stream->Finish();
  if (!status.ok()) {
    std::cerr << "error: " << CodeName(status.error_code()) << " (" << status.error_code()
              << "): " << status.error_message() << std::endl;
    PrintRichDetails(status.error_details());
    return 1;
  }
  if (!answered && exit_code == 0) {
    std::cerr << "error: the stream ended without a result" << std::endl;
    return 1;
  }
  return exit_code;
}

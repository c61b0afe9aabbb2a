-- wrk script: POST a distinct email-send body per request and print a JSON summary.
-- Each body differs (subject and recipient carry the run's nonce, the thread and a counter), so no
-- deduplication applies, also across the several wrk runs made against one ingest.
local counter = 0
local thread_id = 0
local run = "0"
local threads = {}

function setup(thread)
  thread:set("id", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  thread_id = id
  run = args[1] or "0"
  -- An access token, when the target wants one.
  if args[2] and args[2] ~= "" then
    wrk.headers["Authorization"] = "Bearer " .. args[2]
  end
end

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

function request()
  counter = counter + 1
  local body = string.format(
    '{"to": "bench-%s-%d-%d@example.com", "subject": "bench %s-%d-%d", "content": "<p>load test message %d</p>", "content_type": "html"}',
    run, thread_id, counter, run, thread_id, counter, counter)
  return wrk.format(nil, nil, nil, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, "p50_ms": %.3f, "p95_ms": %.3f, "p99_ms": %.3f, "max_ms": %.3f}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50) / 1000, latency:percentile(95) / 1000, latency:percentile(99) / 1000,
    latency.max / 1000))
end

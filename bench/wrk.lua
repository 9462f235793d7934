-- POST a JSON body with a bearer key; print one JSON line of results when done.
wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY")
wrk.headers["Content-Type"] = "application/json"
-- many users, as in production: each request takes the next key
local keys = {}
for key in string.gmatch(os.getenv("BENCH_KEY"), "[^,]+") do keys[#keys + 1] = key end
local n = 0
request = function()
  n = n + 1
  wrk.headers["Authorization"] = "Bearer " .. keys[(n % #keys) + 1]
  return wrk.format()
end

-- BENCH_OVERHEAD=1: also the median of the time the bridge says it spent itself (its
-- x-codeplan-overhead-ms header: everything but waiting for the upstream)
local threads = {}
setup = function(thread) threads[#threads + 1] = thread end
if os.getenv("BENCH_OVERHEAD") == "1" then
  overheads = {}
  response = function(status, headers, body)
    local value = tonumber(headers["x-codeplan-overhead-ms"] or headers["X-Codeplan-Overhead-Ms"])
    if value then overheads[#overheads + 1] = value end
  end
end

done = function(summary, latency, requests)
  local e = summary.errors
  local all = {}
  for _, thread in ipairs(threads) do
    for _, value in ipairs(thread:get("overheads") or {}) do all[#all + 1] = value end
  end
  table.sort(all)
  local overhead = -1
  if #all > 0 then overhead = all[math.floor(#all / 2) + 1] end
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "errors": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "mean_us": %.1f, "overhead_p50_ms": %.3f}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout + e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, overhead))
end

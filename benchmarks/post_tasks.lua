-- wrk script: keep-alive POST /tasks with a JSON body {"data": {"n": i}}.
-- done() prints one "WRK-RESULT {json}" line that benchmarks/wrkdrive.py reads.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

local sent = 0

request = function()
  sent = sent + 1
  return wrk.format(nil, nil, nil, '{"data":{"n":' .. sent .. '}}')
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK-RESULT {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end

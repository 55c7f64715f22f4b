-- wrk script for the backlog: POST /tasks {"data": {"n": i}} until WRK_LIMIT responses,
-- printing "WRK-MARK <responses> <CLOCK_MONOTONIC seconds> <non-2xx>" every WRK_MARK
-- responses (and at 0), then "WRK-LIMIT" and stopping the thread (use with -t1; the
-- caller ends wrk, whose -d only bounds the run). CLOCK_MONOTONIC is Python's
-- time.monotonic(), so the caller can line the marks up with its own samples.
local ffi = require("ffi")
ffi.cdef [[
  typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
  int clock_gettime(int clock, bench_timespec *ts);
]]
local ts = ffi.new("bench_timespec")
local function now()
  ffi.C.clock_gettime(1, ts)
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) / 1e9
end

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

local limit = tonumber(os.getenv("WRK_LIMIT") or "0") or 0
local mark = tonumber(os.getenv("WRK_MARK") or "0") or 0
local sent, answered, failed = 0, 0, 0

local function report()
  io.write(string.format("WRK-MARK %d %.6f %d\n", answered, now(), failed))
  io.flush()
end

init = function(args)
  report()
end

request = function()
  sent = sent + 1
  return wrk.format(nil, nil, nil, '{"data":{"n":' .. sent .. '}}')
end

response = function(status, headers, body)
  answered = answered + 1
  if status >= 300 then
    failed = failed + 1
  end
  if mark > 0 and answered % mark == 0 then
    report()
  end
  if answered >= limit then
    io.write("WRK-LIMIT\n")
    io.flush()
    wrk.thread:stop()
  end
end

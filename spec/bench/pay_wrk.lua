-- wrk script of spec/bench/pay_http.sh: sends pre-generated WeChat Pay v3
-- notifications (spec/bench/pay_tool.lua gen), each once. PAY_REQUESTS
-- names the file, PAY_PATH the path they go to ("/pay/notify"; the
-- ceiling's null route "/bench/null"), PAY_THREADS is wrk's -t; thread k takes lines k,
-- k + PAY_THREADS, ... A thread that runs out starts over (the nonces then
-- repeat and are refused as replays): done() prints "pay_wrk: POOL
-- EXHAUSTED" and the script fails the run. Every answer must be 204;
-- others are counted ("pay_wrk: BAD REPLIES n"). All threads start
-- together and the CPU counters of the run itself are printed: see
-- wrk_start.lua.

local file = os.getenv("PAY_REQUESTS")
local nthreads = tonumber(os.getenv("PAY_THREADS") or "1")
local path = os.getenv("PAY_PATH") or "/pay/notify"

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local start = dofile(here .. "wrk_start.lua")("pay_wrk", file .. ".ready", nthreads)

local threads = {}
local next_id = 0

function setup(thread)
  thread:set("tid", next_id)
  next_id = next_id + 1
  threads[#threads + 1] = thread
end

local reqs, n, i = {}, 0, 0
wrapped = 0
bad = 0

function init()
  local f = assert(io.open(file, "r"), "pay_wrk: cannot open PAY_REQUESTS")
  local line_no = 0
  for line in f:lines() do
    if line_no % nthreads == tid then
      local ts, nonce, sig, serial, body = line:match("^([^\t]+)\t([^\t]+)\t([^\t]+)\t([^\t]+)\t(.*)$")
      assert(ts, "pay_wrk: malformed line in PAY_REQUESTS")
      n = n + 1
      reqs[n] = wrk.format("POST", path, { ["Content-Type"] = "application/json",
        ["Wechatpay-Timestamp"] = ts, ["Wechatpay-Nonce"] = nonce, ["Wechatpay-Signature"] = sig,
        ["Wechatpay-Serial"] = serial, ["Wechatpay-Signature-Type"] = "WECHATPAY2-SHA256-RSA2048" }, body)
    end
    line_no = line_no + 1
  end
  f:close()
  assert(n > 0, "pay_wrk: no requests for this thread")
  start.init_done()
end

function request()
  start.before_request()
  i = i + 1
  if i > n then
    i = 1
    wrapped = wrapped + 1
  end
  return reqs[i]
end

function response(status)
  if status ~= 204 then bad = bad + 1 end
end

function done()
  start.done()
  local nbad = 0
  for _, t in ipairs(threads) do
    if (tonumber(t:get("wrapped")) or 0) > 0 then
      io.write("pay_wrk: POOL EXHAUSTED (a thread sent its notifications again)\n")
    end
    nbad = nbad + (tonumber(t:get("bad")) or 0)
  end
  io.write("pay_wrk: BAD REPLIES " .. nbad .. "\n")
end

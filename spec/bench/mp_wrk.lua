-- wrk script of spec/bench/mp.sh: sends pre-generated WeChat messages
-- (spec/bench/mp_tool.lua gen), each once. MP_REQUESTS names the file
-- ("<path?query>\t<body>" per line); MP_THREADS is wrk's -t, and thread k
-- takes lines k, k + MP_THREADS, ... so no two threads send the same message.
-- A thread that runs out of messages starts over, which would send MsgIds
-- again (wxd answers those from its dedup store): done() then prints
-- "mp_wrk: POOL EXHAUSTED" and mp.sh fails the run.
-- Every response is looked at: status 200 and a body that is an encrypted
-- reply (<xml><Encrypt>...). Others are counted and done() prints
-- "mp_wrk: BAD REPLIES n" (a "success" or an error page is not a round trip).
--
-- All threads start together and the CPU counters of the run itself are
-- printed: see wrk_start.lua.

local file = os.getenv("MP_REQUESTS")
local nthreads = tonumber(os.getenv("MP_THREADS") or "1")

local threads = {}
local next_id = 0

function setup(thread)
  thread:set("tid", next_id)
  next_id = next_id + 1
  threads[#threads + 1] = thread
end

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local start = dofile(here .. "wrk_start.lua")("mp_wrk", file .. ".ready", nthreads)

local reqs, n, i = {}, 0, 0
wrapped = 0 -- globals: done() reads them with thread:get
bad = 0

function init()
  local f = assert(io.open(file, "r"), "mp_wrk: cannot open MP_REQUESTS")
  local line_no = 0
  for line in f:lines() do
    if line_no % nthreads == tid then
      local target, body = line:match("^([^\t]+)\t(.*)$")
      assert(target, "mp_wrk: malformed line in MP_REQUESTS")
      n = n + 1
      reqs[n] = wrk.format("POST", target, { ["Content-Type"] = "text/xml" }, body)
    end
    line_no = line_no + 1
  end
  f:close()
  assert(n > 0, "mp_wrk: no requests for this thread")
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

local find = string.find

function response(status, _, body)
  if status ~= 200 or not find(body, "^<xml><Encrypt>") then bad = bad + 1 end
end

function done()
  start.done()
  local nbad = 0
  for _, t in ipairs(threads) do
    if (tonumber(t:get("wrapped")) or 0) > 0 then
      io.write("mp_wrk: POOL EXHAUSTED (a thread sent its messages again)\n")
    end
    nbad = nbad + (tonumber(t:get("bad")) or 0)
  end
  io.write("mp_wrk: BAD REPLIES " .. nbad .. "\n")
end

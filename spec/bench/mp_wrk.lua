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
-- A start line for all threads. wrk calls each thread's init() in its main
-- thread, one after the other, and starts thread k right after its init,
-- before the next init runs; it starts its clock only once every thread
-- runs. Loading a large message file takes seconds, so thread 0 would send
-- requests on its own, off the clock, for as long as thread 1 loads: they
-- count in wrk's req/s (inflating it), use up messages, and the machine's
-- idle share measured around wrk covers that uneven phase too. So the last
-- thread's init leaves a mark (MP_REQUESTS .. ".ready") when it is done, and
-- every other thread waits for it before its first request (wrk's own check
-- call aside, see request()). The last init
-- and done() print the machine's CPU counters ("mp_wrk: CPU START/END", the
-- "cpu" line of /proc/stat): mp.sh reads the idle share of the run itself
-- from them.

local file = os.getenv("MP_REQUESTS")
local nthreads = tonumber(os.getenv("MP_THREADS") or "1")

local threads = {}
local next_id = 0

function setup(thread)
  thread:set("tid", next_id)
  next_id = next_id + 1
  threads[#threads + 1] = thread
end

local ready_file = file .. ".ready"

local function cpu_line()
  local f = io.open("/proc/stat", "r")
  if not f then return nil end
  local line = f:read("*l")
  f:close()
  return line
end

-- A short sleep without a busy loop (wrk's Lua is LuaJIT: ffi is there).
local sleep_ms
do
  local ok, ffi = pcall(require, "ffi")
  if ok and pcall(ffi.cdef, "int usleep(unsigned int usec);") then
    sleep_ms = function(ms) ffi.C.usleep(ms * 1000) end
  else
    sleep_ms = function() os.execute("sleep 0.01") end
  end
end

local started = false

-- Waits (at most 5 minutes) until the last thread has loaded its messages.
local function wait_for_start()
  started = true
  if tid == nthreads - 1 then return end
  local give_up = os.time() + 300
  while os.time() < give_up do
    local f = io.open(ready_file, "r")
    if f then
      f:close()
      return
    end
    sleep_ms(1)
  end
  io.write("mp_wrk: the last thread never got ready; starting anyway\n")
end

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
  if tid == nthreads - 1 then
    local line = cpu_line()
    if line then io.write("mp_wrk: CPU START ", line, "\n") end
    local r = assert(io.open(ready_file, "w"), "mp_wrk: cannot write " .. ready_file)
    r:close()
  end
end

-- wrk itself calls thread 0's request() once from its main thread, before
-- the later threads' init() (script_verify_request): that call must not wait.
local calls = 0

function request()
  if not started then
    calls = calls + 1
    if tid ~= 0 or calls > 1 then wait_for_start() end
  end
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
  local line = cpu_line()
  if line then io.write("mp_wrk: CPU END ", line, "\n") end
  os.remove(ready_file)
  local nbad = 0
  for _, t in ipairs(threads) do
    if (tonumber(t:get("wrapped")) or 0) > 0 then
      io.write("mp_wrk: POOL EXHAUSTED (a thread sent its messages again)\n")
    end
    nbad = nbad + (tonumber(t:get("bad")) or 0)
  end
  io.write("mp_wrk: BAD REPLIES " .. nbad .. "\n")
end

-- A start line for all of wrk's threads, shared by the wrk scripts of the
-- benchmarks that load a large request file (mp_wrk.lua, pay_wrk.lua).
--
-- wrk calls each thread's init() in its main thread, one after the other,
-- and starts thread k right after its init, before the next init runs; it
-- starts its clock only once every thread runs. Loading a large file takes
-- seconds, so thread 0 would send requests on its own, off the clock, for
-- as long as the later threads load: they count in wrk's req/s (inflating
-- it), use up requests, and the machine's idle share measured around wrk
-- covers that uneven phase too. So the last thread's init leaves a mark
-- (READY_FILE) when it is done, and every other thread waits for it before
-- its first request (wrk's own check call aside, see before_request). The
-- last init and done() print the machine's CPU counters ("<name>: CPU
-- START/END", the "cpu" line of /proc/stat), from which the bench script
-- reads the idle share of the run itself.
--
-- Use: local start = dofile(<dir> .. "/wrk_start.lua")(name, ready_file, nthreads)
-- then start.init_done() at the end of init(), start.before_request() at
-- the top of request(), start.done() in done(). Reads the global `tid` that
-- the script's setup() gave each thread.

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

return function(name, ready_file, nthreads)
  local started, calls = false, 0
  local start = {}

  function start.init_done()
    if tid ~= nthreads - 1 then return end
    local line = cpu_line()
    if line then io.write(name, ": CPU START ", line, "\n") end
    local r = assert(io.open(ready_file, "w"), name .. ": cannot write " .. ready_file)
    r:close()
  end

  -- Waits (at most 5 minutes) until the last thread has loaded. wrk itself
  -- calls thread 0's request() once from its main thread, before the later
  -- threads' init() (script_verify_request): that call must not wait.
  function start.before_request()
    if started then return end
    calls = calls + 1
    if tid == 0 and calls == 1 then return end
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
    io.write(name, ": the last thread never got ready; starting anyway\n")
  end

  function start.done()
    local line = cpu_line()
    if line then io.write(name, ": CPU END ", line, "\n") end
    os.remove(ready_file)
  end

  return start
end

--- wxd.task: run a function in its own coroutine and wait for its end.
-- `spawn` starts the function at once (inside the call, until it first
-- waits); any number of coroutines may then wait for it, each with its own
-- timeout, and are resumed by the core the moment it ends: no polling, no
-- timer tick. A waiter that times out gets `nil, "timeout"` while the task
-- goes on. Tasks belong to the app generation that spawned them: after a
-- reload they finish on their old code. The full contract is docs/task.md.
-- @module wxd.task
-- @usage
-- local task = require "wxd.task"
-- local h = task.spawn(handle_message, msg)
-- local reply, err = h:wait(4500)       -- the 5-second rule
-- if err == "timeout" then return "success" end -- h goes on; reply later

local core = require "wxd.core.task"
local trace_ids = require("wxd.trace").ids
local core_spawn = core.spawn

local _M = {}

--- Runs fn(...) in a new coroutine, now, until it first waits or ends.
-- Raises outside a wxd coroutine (while app.lua loads, or inside your own
-- coroutine.wrap), and when fn is not a function.
-- @tparam function fn
-- @param ... its arguments
-- @treturn userdata a handle: `h:wait([timeout_ms])` -> fn's results, or
--   `nil, "timeout"`, `nil, err` (fn raised; err is a string) or
--   `nil, "cancelled"`; `h:cancel()` -> true, or false once it has ended;
--   `h:done()` -> boolean; `h:status()` -> "running", "done", "failed"
--   or "cancelled"
-- A task takes a copy of its spawner's trace context (log lines, outbound
-- calls); reading the ids first settles the request's openid in it.
function _M.spawn(fn, ...)
  trace_ids()
  return core_spawn(fn, ...)
end

return _M

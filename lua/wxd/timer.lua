--- wxd.timer: run a function later or periodically, without blocking.
-- Each run is its own coroutine, so it may wait (wxd.sleep, later fetch or
-- redis) like a handler. Errors are logged ("timer error", with traceback)
-- and a repeating timer keeps going. A repeating timer whose previous run
-- still waits skips that tick.
--
-- Timers belong to the app generation that created them: created while
-- app.lua loads, they start once the generation is committed; a reload stops
-- every timer of the replaced generation (no duplicate jobs after reloads),
-- and so does shutdown.
-- @module wxd.timer
-- @usage
-- local timer = require "wxd.timer"
-- timer.every(60000, refresh_certificates, { worker = 0 }) -- one per process
-- local t = timer.after(500, function() log.info("later") end)
-- t:cancel()

local core = require "wxd.core.timer"

local _M = {}

--- Runs fn once after ms milliseconds.
-- @tparam number ms delay, 0..1e10
-- @tparam function fn
-- @tparam[opt] table opts `{ worker = N }`: only on worker N (others get an
--   inactive handle); in `wxd script` it always runs
-- @treturn userdata handle with :cancel() and :active()
_M.after = core.after

--- Runs fn every ms milliseconds (first run after ms).
-- @tparam number ms interval, 1..1e10
-- @tparam function fn
-- @tparam[opt] table opts `{ worker = 0 }` for background jobs that must run
--   once per process, not once per worker
-- @treturn userdata handle with :cancel() and :active()
_M.every = core.every

return _M

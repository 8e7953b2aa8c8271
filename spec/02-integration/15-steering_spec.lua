-- Which worker gets a new connection (core/steer.h): by the CPU that
-- received it ("cpu"), by a hash of its addresses ("hash"), or by CPU until
-- one worker saturates while CPUs idle ("auto", the default). Clients are
-- pinned to a CPU with taskset, so the CPU that processes their SYN (on
-- loopback: the client's own) is known.
local H = require "helpers"
local cjson = require "cjson"
local wxd = require "wxd"

local NCPU = tonumber((H.sh("nproc"):match("%d+")))

-- The worker that serves each of n fresh connections made from `cpu`.
local function workers_from(srv, cpu, n)
  local out, seen = {}, {}
  for _ = 1, n do
    local body = H.sh(string.format("taskset -c %d curl -s --max-time 5 http://127.0.0.1:%d/worker", cpu, srv.port))
    local w = tonumber(body:match("^(%d+)"))
    out[#out + 1] = w
    seen[w] = (seen[w] or 0) + 1
  end
  return out, seen
end

local function count(t) local n = 0 for _ in pairs(t) do n = n + 1 end return n end

local function status(srv)
  local r = H.sh("curl -s --max-time 5 http://127.0.0.1:" .. srv.admin .. "/status")
  return cjson.decode(r)
end

-- Polls the status every half second: a busier poll would itself use the
-- idle CPU that auto steering looks for.
local function wait_steering(srv, want, timeout, what)
  local deadline = wxd.monotonic_ms() + timeout * 1000
  while status(srv).steering.now ~= want do
    if wxd.monotonic_ms() > deadline then error("timed out waiting for " .. what, 2) end
    wxd.sleep(500)
  end
end

local function start(steering, extra_env)
  local admin = H.free_port()
  local srv = H.start(H.app("basic"), { workers = 2, steering = steering, env = extra_env,
                                        args = "--admin 127.0.0.1:" .. admin })
  srv.admin = admin
  return srv
end

describe("connection steering", function()
  -- Steering by CPU needs two CPUs to tell apart: on a smaller machine
  -- these specs are skipped, and counted as skipped.
  local it = it
  if NCPU < 2 then
    it = function(name) pending(name .. " (needs 2 CPUs, this machine has " .. tostring(NCPU) .. ")") end
  end

  it("by CPU: every connection made from one CPU goes to one worker, another CPU's to the other", function()
    local srv = start("cpu")
    local ok, err = pcall(function()
      local _, from0 = workers_from(srv, 0, 8)
      local _, from1 = workers_from(srv, 1, 8)
      assert.equal(1, count(from0), "CPU 0's connections: " .. cjson.encode(from0))
      assert.equal(1, count(from1), "CPU 1's connections: " .. cjson.encode(from1))
      assert.are_not.same(next(from0), next(from1))
      assert.equal("cpu", status(srv).steering.now)
    end)
    srv:stop(); srv:cleanup()
    assert(ok, err)
  end)

  it("by hash: connections from one CPU are spread over the workers", function()
    local srv = start("hash")
    local ok, err = pcall(function()
      local _, seen = workers_from(srv, 0, 24)
      assert.equal(2, count(seen), "24 connections all went to one worker")
      assert.equal("hash", status(srv).steering.now)
    end)
    srv:stop(); srv:cleanup()
    assert(ok, err)
  end)

  it("auto: spreads by hash while one worker is saturated and a CPU idles, then steers by CPU again", function()
    -- Shorter hysteresis, and no idle CPU asked for: the machine that
    -- runs the specs may be busy with other work.
    local srv = start("auto", "WXD_STEERING_CALM_S=2 WXD_STEERING_IDLE_CPU=0")
    local ok, err = pcall(function()
      assert.equal("cpu", status(srv).steering.now)
      -- Four connections from CPU 0, each asking for 50 ms of CPU: all on one
      -- worker, which is then busy all the time, while the client idles.
      local job = H.sh(string.format("(taskset -c 0 wrk -t1 -c4 -d8s 'http://127.0.0.1:%d/spin?ms=50' "
        .. ">/dev/null 2>&1 &) ; echo started", srv.port))
      assert.matches("started", job)
      -- A generous deadline: on a loaded machine wrk's CPU may come late.
      wait_steering(srv, "hash", 60, "the switch to hash")
      local line
      for l in srv:log_text():gmatch("[^\n]+") do
        if l:find("steering changed", 1, true) then line = cjson.decode(l) end
      end
      assert.equal("hash", line.steering)
      -- The switch is made only for a saturated worker (steer.c: busy >= 0.9).
      assert.is_true(line.busy >= 0.9, "busy " .. tostring(line.busy))
      -- New connections from one CPU are spread now.
      local _, seen = workers_from(srv, 1, 24)
      assert.equal(2, count(seen))
      -- Once the load is gone (wrk ends after 8 s) and the workers are quiet
      -- for WXD_STEERING_CALM_S, it steers by CPU again.
      wait_steering(srv, "cpu", 60, "the switch back to cpu")
      assert.equal(2, status(srv).steering.changes)
    end)
    if not ok then print(srv:log_text(), cjson.encode(status(srv)), H.sh("ps aux | grep wrk")) end
    H.sh("pkill -f 'wrk -t1 -c4 -d8s http://127.0.0.1:" .. srv.port .. "'")
    srv:stop(); srv:cleanup()
    assert(ok, err)
  end)

  it("refuses a steering it does not know, naming the key", function()
    local dir = H.tmpdir()
    H.write_file(dir .. "/config.lua", 'return { steering = "round-robin" }')
    H.write_file(dir .. "/app.lua", 'return require("wxd.app").new()')
    local out, code = H.sh(H.WXD .. " check " .. dir)
    assert.are_not.equal(0, code)
    assert.matches('steering: expected "auto", "cpu" or "hash"', out)
    os.execute("rm -rf " .. dir)
  end)

  it("ignores an unknown WXD_STEERING with a warning naming it, and keeps the configured steering", function()
    local dir = H.tmpdir()
    H.write_file(dir .. "/config.lua", 'return { steering = "hash" }')
    H.write_file(dir .. "/app.lua", 'return require("wxd.app").new()')
    local out, code = H.sh("WXD_STEERING=bogus " .. H.WXD .. " check " .. dir)
    assert.equal(0, code, out)
    assert.matches("WXD_STEERING=bogus ignored: expected auto, cpu or hash", out, 1, true)
    local srv = start("bogus")
    local ok, err = pcall(function()
      assert.matches("WXD_STEERING=bogus ignored", srv:log_text(), 1, true)
      assert.equal("auto", status(srv).steering.mode)
    end)
    srv:stop(); srv:cleanup()
    os.execute("rm -rf " .. dir)
    assert(ok, err)
  end)
end)

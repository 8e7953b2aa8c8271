-- No leak across 100k requests: a wxd server (2 workers) whose handler
-- makes an outbound request (wxd.http, through its per-worker pool, back to
-- itself), touches a shared dictionary and a timer. Its open descriptors
-- and resident memory are read from /proc after a warm-up and after 100k
-- more requests. Under `make asan` LeakSanitizer checks the same process
-- at exit (srv:stop fails the spec on a report), and the RSS bound is not
-- applied (ASan's quarantine holds freed memory on purpose).
local H = require "helpers"
local wxd = require "wxd"
local http = require "wxd.http"
local timer = require "wxd.timer"

local N = tonumber(os.getenv("SPEC_SOAK_REQUESTS")) or 100000
local CLIENTS = 32

local function fds(pid)
  local out = H.sh("ls /proc/" .. pid .. "/fd | wc -l")
  return tonumber(out:match("%d+"))
end

local function rss_kb(pid)
  local status = H.read_file("/proc/" .. pid .. "/status") or ""
  return tonumber(status:match("VmRSS:%s*(%d+)"))
end

describe("100k requests through the I/O primitives", function()
  local srv, url
  setup(function()
    srv = H.start(H.app("upstream"), { workers = 2 })
    url = "http://127.0.0.1:" .. srv.port .. "/proxy?port=" .. srv.port .. "&path=/conn-id"
  end)
  teardown(function()
    srv:stop()
    srv:cleanup()
  end)

  -- n requests from CLIENTS coroutines of this script; returns failures.
  local function drive(n)
    http.configure { max_conns_per_host = CLIENTS, max_idle_per_host = CLIENTS }
    local sent, done, failed, first_err = 0, 0, 0, nil
    for _ = 1, CLIENTS do
      timer.after(0, function()
        while sent < n do
          sent = sent + 1
          local res, err, detail = http.get(url, { timeout = 10 })
          if not res or res.status ~= 200 then
            failed = failed + 1
            first_err = first_err or (err and (err .. ": " .. tostring(detail)) or ("status " .. res.status))
          end
          done = done + 1
        end
      end)
    end
    H.wait_until(function() return done >= n end, 600, n .. " requests")
    return failed, first_err
  end

  it("leaks no descriptor and no memory", function()
    local t0 = wxd.monotonic_ms()
    assert.equal(0, (drive(10000)))
    local fd0, rss0 = fds(srv.pid), rss_kb(srv.pid)
    local failed, err = drive(N)
    local secs = (wxd.monotonic_ms() - t0) / 1000
    local fd1, rss1 = fds(srv.pid), rss_kb(srv.pid)
    print(string.format("\n    %d requests (+10k warm-up, each with an outbound request) in %.1f s:"
      .. " fds %d -> %d, RSS %.1f -> %.1f MB", N, secs, fd0, fd1, rss0 / 1024, rss1 / 1024))
    assert.equal(0, failed, err)
    -- The same number of clients keeps the same connections open (a few may
    -- be between a close at max_requests_per_connection and the next open).
    assert.is_true(fd1 <= fd0 + 8, "descriptors grew from " .. fd0 .. " to " .. fd1)
    if os.getenv("WXD_SANITIZED") ~= "1" then
      assert.is_true(rss1 - rss0 < 16 * 1024, string.format("RSS grew by %.1f MB", (rss1 - rss0) / 1024))
    end
    -- Every request went through, each twice (/proxy, then its outbound
    -- /conn-id): the server counted them.
    local seen = require("cjson").decode(srv:get("/conns").body)
    assert.equal(2 * (N + 10000), seen.requests)
  end)
end)

-- examples/hello: the smallest wxd app, also the benchmark target.
local wxd = require "wxd"
local app = require("wxd.app").new()
local limit = require "wxd.limit"

app:get("/hello", function()
  return "hello world\n"
end)

app:get("/json", function()
  return { message = "hello world" }
end)

-- Waits without blocking the worker: other requests are served meanwhile.
app:get("/sleep", function(req)
  local ms = tonumber(req.query.ms)
  if not ms or ms < 0 or ms > 60000 or ms % 1 ~= 0 then
    return 400, "ms must be an integer in 0..60000\n"
  end
  wxd.sleep(ms)
  return "slept " .. ms .. "\n"
end)

-- 50 requests per second with bursts of 10 per client address, counted
-- once for the whole process (every worker takes from the same bucket).
app:get("/limited", limit.route({ name = "hello_limited", rate = 50, burst = 10 }, function()
  return "ok " .. wxd.worker_id() .. "\n"
end))

-- Fetches the URL in env WXD_HELLO_UPSTREAM and returns its body: the call
-- carries this request's traceparent and X-Request-Id (docs/observability.md).
app:get("/upstream", function()
  local url = os.getenv("WXD_HELLO_UPSTREAM")
  if not url or url == "" then return 500, "WXD_HELLO_UPSTREAM is not set\n" end
  local res, err, detail = wxd.http.get(url, { timeout = 10 })
  if not res then return 502, "upstream: " .. err .. " (" .. tostring(detail) .. ")\n" end
  return res.status, res.body
end)

return app

-- examples/hello: the smallest wxd app, also the benchmark target.
local wxd = require "wxd"
local app = require("wxd.app").new()

app:get("/hello", function()
  return "hello world\n"
end)

app:get("/json", function()
  return { message = "hello world" }
end)

-- Waits without blocking the worker: other requests are served meanwhile.
app:get("/sleep", function(req)
  local ms = tonumber(req.query.ms) or 0
  if ms < 0 or ms > 60000 then return 400, "ms must be in 0..60000\n" end
  wxd.sleep(ms)
  return "slept " .. req.query.ms .. "\n"
end)

return app

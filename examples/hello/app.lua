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
  local ms = tonumber(req.query.ms)
  if not ms or ms < 0 or ms > 60000 or ms % 1 ~= 0 then
    return 400, "ms must be an integer in 0..60000\n"
  end
  wxd.sleep(ms)
  return "slept " .. ms .. "\n"
end)

return app

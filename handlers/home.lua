-- Handlers of the default app. Edit freely: this is your code.
local wxd = require "wxd"

return function(app)
  app:get("/", function()
    return "wxd " .. wxd.version .. " is running. Edit handlers/ to make it yours.\n"
  end)

  app:get("/health", function()
    return { status = "ok", worker = wxd.worker_id(), time = wxd.now() }
  end)
end

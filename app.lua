-- The default app: `make run` serves it on 127.0.0.1:8080.
-- Routes live in handlers/ (the part you edit); this file wires them up.
local app = require("wxd.app").new()

require("handlers.home")(app)
require("handlers.wechat")(app) -- /wx, when WXD_MP_APPID and WXD_MP_TOKEN are set

return app

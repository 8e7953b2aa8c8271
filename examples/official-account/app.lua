-- examples/official-account: an Official Account callback at /wx.
--
--   WXD_MP_APPID=wx... WXD_MP_TOKEN=... WXD_MP_AES_KEY=... WXD_MP_SECRET=... \
--     build/wxd run examples/official-account
--
-- GET /jssdk/config?url=https://your.site/page → the JS-SDK config of that
-- page (needs WXD_MP_SECRET).
--
-- Then set the server URL of the account to https://<your host>/wx (behind a
-- proxy that terminates TLS), with the same Token and EncodingAESKey.
local wxd = require "wxd"
local app = require("wxd.app").new()

require("handlers.wechat").mount(app, wxd.config.mp)

app:get("/health", function() return { status = "ok" } end)

return app

-- spec/bench/mp_app: settings from the environment that spec/bench/mp.sh
-- sets (the same token, appid and EncodingAESKey as the Node peer).
return {
  listen = "127.0.0.1:8080",
  mp = {
    appid = env("MP_APPID"),
    token = env("MP_TOKEN"),
    aes_key = env("MP_AES_KEY"),
  },
}

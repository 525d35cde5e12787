#!/usr/bin/env bash
# A Node project's everyday scripts through npm: a build that runs node and
# shell commands, the tests, a lint one-liner.
. "$(dirname "$0")/../lib.sh"
app=$(vs_app_root); cd "$app"
export NO_UPDATE_NOTIFIER=1 npm_config_update_notifier=false npm_config_fund=false npm_config_audit=false
cat >package.json <<'JSON'
{
  "name": "shop-front",
  "version": "1.0.0",
  "private": true,
  "scripts": {
    "build": "mkdir -p dist && node build.js && cp -r static dist/ && echo built",
    "test": "node test.js",
    "lint": "node -e \"require('./build.js')\" && echo lint ok"
  }
}
JSON
mkdir -p static; echo 'body{}' >static/site.css
cat >build.js <<'JS'
const fs = require('fs');
fs.mkdirSync('dist', { recursive: true });
fs.writeFileSync('dist/app.js', '// ' + Date.now() + '\n');
JS
printf 'require("assert").strictEqual(1 + 1, 2);\n' >test.js
npm run -s build >/dev/null
npm test -s >/dev/null
npm run -s lint >/dev/null

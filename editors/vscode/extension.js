// Starts `gradlang lsp` (the command in the setting gradlang.server.command) for .grad files.
const vscode = require("vscode");
const { LanguageClient } = require("vscode-languageclient/node");

let client;

function activate() {
  const command = vscode.workspace.getConfiguration("gradlang").get("server.command", "gradlang");
  if (!command) {
    return;
  }
  client = new LanguageClient(
    "gradlang",
    "gradlang language server",
    { command, args: ["lsp"] },
    { documentSelector: [{ language: "grad" }] },
  );
  return client.start();
}

function deactivate() {
  return client ? client.stop() : undefined;
}

module.exports = { activate, deactivate };

# Register VM ERP-01 on hv1 from its replicated folder; never auto-start it.
# Runs on both hosts at install (and again from start_prim): checks the virtual switches exist
# here under the same names, registers the VM in place (Compare-VM -Register: its files stay in
# the replicated folder) and reports every incompatibility Compare-VM finds.
. (Join-Path $PSScriptRoot 'env.ps1')
if ($VmSwitch -and -not (Get-VMSwitch -Name $VmSwitch -ErrorAction SilentlyContinue)) {
    throw "virtual switch '$VmSwitch' is missing on hv1: create it with the same name on both hosts"
}
$vm = Get-VM -Name $VmName -ErrorAction SilentlyContinue
if (-not $vm) {
    $config = Get-ChildItem -Path $VmDir -Recurse -Filter '*.vmcx' | Select-Object -First 1
    if (-not $config) { Write-Warning "no .vmcx under $VmDir yet (replication brings it)"; exit 0 }
    $report = Compare-VM -Path $config.FullName -Register
    if ($report.Incompatibilities.Count -gt 0) {
        $lines = $report.Incompatibilities | ForEach-Object { "  [$($_.MessageId)] $($_.Message)" }
        throw ("VM $VmName cannot be registered on hv1 from $($config.FullName):`n" + ($lines -join "`n") + "`nfix these on this host (same switch names, same VM configuration version support) and retry")
    }
    $vm = Import-VM -CompatibilityReport $report
}
$missing = @(Get-VMNetworkAdapter -VM $vm | Where-Object { $_.SwitchName -and -not (Get-VMSwitch -Name $_.SwitchName -ErrorAction SilentlyContinue) } | ForEach-Object { $_.SwitchName })
if ($missing.Count -gt 0) {
    throw "VM $VmName uses virtual switch(es) $($missing -join ', ') missing on hv1: create them with the same names on both hosts"
}
Set-VM -VM $vm -AutomaticStartAction Nothing -AutomaticStopAction TurnOff

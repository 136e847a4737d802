# Exit 0 while VM ERP-01 runs and its Heartbeat integration service answers.
# PrimaryOperationalStatus is culture neutral (2 OK, 12 no contact yet: the guest is booting or
# has no integration services; 13 lost communication: the guest OS stopped answering).
. (Join-Path $PSScriptRoot 'env.ps1')
$vm = Get-VM -Name $VmName -ErrorAction SilentlyContinue
if (-not $vm -or $vm.State -ne 'Running') { exit 1 }
$hb = Get-VMIntegrationService -VM $vm | Where-Object { "$($_.Id)" -match "$HeartbeatId`$" } | Select-Object -First 1
if ($hb -and $hb.Enabled -and ([int]$hb.PrimaryOperationalStatus -notin @(2, 12))) {
    Write-Output "VM $VmName heartbeat: $($hb.PrimaryStatusDescription)"
    exit 1
}
exit 0
